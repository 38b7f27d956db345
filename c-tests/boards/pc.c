/*
 * The i440FX/PIIX machine types "pc-i440fx-X.Y" (QEMU's hw/i386/pc_piix.c), memory part: where
 * main RAM splits around 4 GiB; the map itself is pc-common.c's. One init serves every version.
 *
 * The versions are the ones QEMU 10.0 still supports (7.1 to 10.0; older ones are deprecated
 * there). What QEMU changes between them, as far as guest RAM goes (pc_i440fx_machine_*_options,
 * hw_compat_* in hw/core/machine.c, pc_compat_* in hw/i386/pc.c):
 *   - nothing in the RAM layout: gigabyte_align, has_reserved_memory and the default RAM
 *     backend are the same for all of them, and no compat property touches memory backends
 *     (the first one, x-use-canonical-path-for-ramblock-id, is in hw_compat_3_1);
 *   - <= 9.0: isa_bios_alias = false, which only matters with a pflash firmware image (vmm takes
 *     no -drive; with the ROM BIOS "isa-bios" is an alias of "pc.bios" in every version);
 *   - <= 8.1: broken_32bit_mem_addr_check, the phys-bits check of 32-bit CPUs (pc_compat_8_1);
 *     <= 9.0: smbios_memory_device_size 16 GiB (SMBIOS tables only);
 *   - the migration stream: <= 9.2 send no SWITCHOVER_START ("send-switchover-start"),
 *     <= 8.2 use legacy zero-page detection, <= 8.0 flush multifd after each section,
 *     <= 7.2 "x-preempt-pre-7-2" (hw_compat_9_2, _8_2, _8_0, _7_2; the migration code's
 *     business, keyed by the machine type name).
 *   - <= 7.0 (not offered here) do not relocate RAM above 1 TiB for the AMD HyperTransport
 *     hole (enforce_amd_1tb_hole); every version here does (pc-common.c).
 */
#include <inttypes.h>

#include "boards.h"

/* The i440FX host bridge's default pci-hole64-size. */
#define I440FX_PCI_HOLE64_SIZE (2 * GiB)

static void pc_i440fx_init(MachineState *machine)
{
    /*
     * Traditionally 3.5 GiB of RAM below 4 GiB (max-ram-below-4g lowers or raises it); with
     * gigabyte alignment (every version QEMU 10 has) a guest that does not fit keeps at most
     * 3 GiB there so that the rest starts on a gigabyte boundary above 4 GiB.
     */
    uint64_t max_below_4g = pc_max_ram_below_4g(machine, 0xe0000000);
    uint64_t lowmem = max_below_4g;

    if (machine->ram_size >= max_below_4g) {
        if (lowmem > 0xc0000000) {
            lowmem = 0xc0000000;
        }
        if (lowmem & (GiB - 1)) {
            board_warn("Large machine and max_ram_below_4g (%" PRIu64 ") not a multiple of 1G; "
                       "possible bad performance.", max_below_4g);
        }
    }
    pc_board_init(machine, machine->ram_size >= lowmem ? lowmem : machine->ram_size,
                  I440FX_PCI_HOLE64_SIZE);
}

/* QEMU's DEFINE_I440FX_MACHINE: the latest version is the default and has the alias "pc". */
#define I440FX_MACHINE(major, minor, alias_, is_default_, compat_) \
    {                                                     \
        .name = "pc-i440fx-" MACHINE_VER_STR(major, minor), \
        .alias = alias_,                                  \
        .desc = "Standard PC (i440FX + PIIX, 1996)",      \
        .family = "pc_piix",                              \
        .init = pc_i440fx_init,                           \
        .cleanup = board_cleanup,                         \
        .default_ram_size = 128 * MiB,                    \
        .default_ram_id = "pc.ram",                       \
        .numa_mem_supported = false,                      \
        .is_default = is_default_,                        \
        .deprecation_reason = MACHINE_VER_DEPRECATION(major, minor), \
        .default_cpu_type = PC_DEFAULT_CPU_TYPE,          \
        .properties = pc_machine_properties,              \
        .class_data = &compat_,                           \
    }

static const MachineClass pc_i440fx_machines[] = {
    I440FX_MACHINE(10, 0, "pc", true, pc_compat_current),
    I440FX_MACHINE(9, 2, NULL, false, pc_compat_current),
    I440FX_MACHINE(9, 1, NULL, false, pc_compat_current),
    I440FX_MACHINE(9, 0, NULL, false, pc_compat_current),
    I440FX_MACHINE(8, 2, NULL, false, pc_compat_current),
    I440FX_MACHINE(8, 1, NULL, false, pc_compat_8_1),
    I440FX_MACHINE(8, 0, NULL, false, pc_compat_8_1),
    I440FX_MACHINE(7, 2, NULL, false, pc_compat_8_1),
    I440FX_MACHINE(7, 1, NULL, false, pc_compat_8_1),
};

bool pc_i440fx_machine_register(Error **errp)
{
    return board_register_classes(pc_i440fx_machines,
                                  sizeof(pc_i440fx_machines) / sizeof(pc_i440fx_machines[0]),
                                  errp);
}
