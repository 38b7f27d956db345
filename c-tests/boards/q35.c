/*
 * The Q35/ICH9 machine types "pc-q35-X.Y" (QEMU's hw/i386/pc_q35.c), memory part. One init
 * serves every version.
 *
 * The versions are the ones QEMU 10.0 still supports (7.1 to 10.0). Their RAM-relevant
 * differences are the i440FX ones (see pc.c: none in the layout; isa_bios_alias <= 9.0 with
 * pflash only, broken_32bit_mem_addr_check <= 8.1 (pc_compat_8_1), the migration compat
 * properties); the
 * other Q35 difference, max_cpus (1024 in 8.1 and 8.2, 288 in 8.0 and older), is not about
 * RAM. Unlike i440FX, the latest Q35 version has the alias "q35" but is not the default.
 */
#include <inttypes.h>

#include "boards.h"

/* The MCH's default pci-hole64-size. */
#define Q35_PCI_HOLE64_SIZE (32 * GiB)

static void pc_q35_init(MachineState *machine)
{
    /*
     * The MMCONFIG window sits at 2.75 GiB (0xb0000000): a guest whose RAM reaches it keeps
     * only 2 GiB below 4 GiB, a smaller one keeps everything there; max-ram-below-4g can only
     * lower that.
     */
    uint64_t lowmem = machine->ram_size >= 0xb0000000 ? 0x80000000 : 0xb0000000;
    uint64_t max_below_4g = pc_max_ram_below_4g(machine, 4 * GiB);

    if (lowmem > max_below_4g) {
        lowmem = max_below_4g;
        if (machine->ram_size - lowmem > lowmem && (lowmem & (GiB - 1))) {
            /* QEMU's words, with its doubled space and "then". */
            board_warn("There is possibly poor performance as the ram size  (0x%" PRIx64
                       ") is more then twice the size of max-ram-below-4g (%" PRIu64
                       ") and max-ram-below-4g is not a multiple of 1G.",
                       machine->ram_size, max_below_4g);
        }
    }
    pc_board_init(machine, machine->ram_size >= lowmem ? lowmem : machine->ram_size,
                  Q35_PCI_HOLE64_SIZE);
}

/* QEMU's DEFINE_Q35_MACHINE. */
#define Q35_MACHINE(major, minor, alias_, compat_)        \
    {                                                     \
        .name = "pc-q35-" MACHINE_VER_STR(major, minor),  \
        .alias = alias_,                                  \
        .desc = "Standard PC (Q35 + ICH9, 2009)",         \
        .family = "pc_q35",                               \
        .init = pc_q35_init,                              \
        .cleanup = board_cleanup,                         \
        .default_ram_size = 128 * MiB,                    \
        .default_ram_id = "pc.ram",                       \
        .numa_mem_supported = false,                      \
        .is_default = false,                              \
        .deprecation_reason = MACHINE_VER_DEPRECATION(major, minor), \
        .default_cpu_type = PC_DEFAULT_CPU_TYPE,          \
        .properties = pc_machine_properties,              \
        .class_data = &compat_,                           \
    }

static const MachineClass pc_q35_machines[] = {
    Q35_MACHINE(10, 0, "q35", pc_compat_current),
    Q35_MACHINE(9, 2, NULL, pc_compat_current),
    Q35_MACHINE(9, 1, NULL, pc_compat_current),
    Q35_MACHINE(9, 0, NULL, pc_compat_current),
    Q35_MACHINE(8, 2, NULL, pc_compat_current),
    Q35_MACHINE(8, 1, NULL, pc_compat_8_1),
    Q35_MACHINE(8, 0, NULL, pc_compat_8_1),
    Q35_MACHINE(7, 2, NULL, pc_compat_8_1),
    Q35_MACHINE(7, 1, NULL, pc_compat_8_1),
};

bool pc_q35_machine_register(Error **errp)
{
    return board_register_classes(pc_q35_machines,
                                  sizeof(pc_q35_machines) / sizeof(pc_q35_machines[0]), errp);
}
