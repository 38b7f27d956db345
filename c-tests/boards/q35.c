/* The Q35/ICH9 machine "pc-q35-10.0" (QEMU's hw/i386/pc_q35.c), memory part. */
#include "boards.h"

static void pc_q35_init(MachineState *machine)
{
    /*
     * The MMCONFIG window sits at 2.75 GiB (0xb0000000): a guest whose RAM reaches it keeps
     * only 2 GiB below 4 GiB, a smaller one keeps everything there.
     */
    uint64_t lowmem = machine->ram_size >= 0xb0000000 ? 0x80000000 : 0xb0000000;

    pc_board_init(machine, lowmem);
}

static const MachineClass pc_q35_machine = {
    .name = "pc-q35-10.0",
    .alias = "q35",
    .desc = "Standard PC (Q35 + ICH9, 2009)",
    .init = pc_q35_init,
    .cleanup = board_cleanup,
    .default_ram_size = 128 * MiB,
    .default_ram_id = "pc.ram",
    .numa_mem_supported = false,
    .is_default = false,
};

bool pc_q35_machine_register(Error **errp)
{
    return hm_machine_class_register(&pc_q35_machine, errp);
}
