/*
 * The i440FX/PIIX machine "pc-i440fx-10.0" (QEMU's hw/i386/pc_piix.c), memory part: where
 * main RAM splits around 4 GiB; the map itself is pc-common.c's.
 */
#include "boards.h"

/* Only the piix rule changes with machine versions in QEMU; 10.0 aligns to a gigabyte. */
#define PIIX_GIGABYTE_ALIGN true

static void pc_i440fx_init(MachineState *machine)
{
    /*
     * Traditionally 3.5 GiB of RAM below 4 GiB; with gigabyte alignment a guest that does not
     * fit gets only 3 GiB there so that the rest starts on a gigabyte boundary above 4 GiB.
     */
    uint64_t lowmem = 0xe0000000;

    if (machine->ram_size >= lowmem && PIIX_GIGABYTE_ALIGN) {
        lowmem = 0xc0000000;
    }
    pc_board_init(machine, lowmem);
}

static const MachineClass pc_i440fx_machine = {
    .name = "pc-i440fx-10.0",
    .alias = "pc",
    .desc = "Standard PC (i440FX + PIIX, 1996)",
    .init = pc_i440fx_init,
    .cleanup = board_cleanup,
    .default_ram_size = 128 * MiB,
    .default_ram_id = "pc.ram",
    .numa_mem_supported = false,
    .is_default = true,
};

bool pc_i440fx_machine_register(Error **errp)
{
    return hm_machine_class_register(&pc_i440fx_machine, errp);
}
