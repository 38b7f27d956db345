/*
 * A fixed-size board, modelled on QEMU's "sx1" (Siemens SX1 phone, OMAP310; hw/arm/omap_sx1.c
 * and the OMAP1 SoC's memory): 32 MiB of SDRAM, the only size the hardware has, plus the SoC's
 * internal SRAM. Converted: SDRAM is machine->ram ("omap1.dram"), so -mem-path,
 * -mem-prealloc and memory-backend= work; any -m other than 32 MiB is refused.
 */
#include "boards.h"

#define SX1_SDRAM_SIZE (32 * MiB)
#define OMAP_EMIFF_BASE 0x10000000
#define OMAP_IMIF_BASE 0x20000000
#define OMAP15XX_SRAM_SIZE 0x30000

typedef struct SX1State {
    MemoryRegion imif_ram;
} SX1State;

static void sx1_init(MachineState *machine)
{
    SX1State *s;

    if (machine->ram_size != SX1_SDRAM_SIZE) {
        char *sz = size_to_str(SX1_SDRAM_SIZE);

        /* board_fatal exits: the string goes with the process, as in QEMU. */
        board_fatal("Invalid RAM size, should be %s", sz);
    }

    s = board_new0(sizeof(*s));
    machine->opaque = s;
    memory_region_add_subregion(get_system_memory(), OMAP_EMIFF_BASE, machine->ram);

    /* The SoC's own SRAM: fixed, not the machine's RAM, so no option touches it. */
    memory_region_init_ram(&s->imif_ram, NULL, "omap1.sram", OMAP15XX_SRAM_SIZE,
                           &error_fatal);
    memory_region_add_subregion(get_system_memory(), OMAP_IMIF_BASE, &s->imif_ram);
}

static const MachineClass sx1_machine = {
    .name = "sx1",
    .alias = NULL,
    .desc = "Siemens SX1 (OMAP310) V2",
    .init = sx1_init,
    .cleanup = board_cleanup,
    .default_ram_size = SX1_SDRAM_SIZE,
    .default_ram_id = "omap1.dram",
    .numa_mem_supported = false,
    .is_default = false,
    .no_numa_support = true,
};

bool sx1_machine_register(Error **errp)
{
    return hm_machine_class_register(&sx1_machine, errp);
}
