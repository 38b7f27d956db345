/*
 * The sx1 board before its conversion (docs/CONVERTING-A-BOARD.md starts from this file):
 * Siemens SX1 (OMAP310) with 32 MiB SDRAM at OMAP_EMIFF_BASE allocated by the legacy
 * memory_region_allocate_system_memory(), plus the SoC's internal SRAM (flash is not
 * modelled). The meson build compiles it, so it keeps matching the header; nothing links it.
 * The converted board is c-tests/boards/sx1.c.
 */
#include "boards.h"

#define OMAP_EMIFF_BASE   0x10000000ULL
#define OMAP_IMIF_BASE    0x20000000ULL
#define SX1_SDRAM_SIZE    (32 * MiB)
#define OMAP15XX_SRAM_SIZE (192 * KiB)

typedef struct SX1State {
    MemoryRegion dram;
    MemoryRegion sram;
} SX1State;

static void sx1_init(MachineState *machine)
{
    SX1State *s = board_new0(sizeof(*s));

    machine->opaque = s;
    /* The hardware has 32 MiB, whatever -m says. */
    memory_region_allocate_system_memory(&s->dram, NULL, "omap1.dram", SX1_SDRAM_SIZE);
    memory_region_add_subregion(get_system_memory(), OMAP_EMIFF_BASE, &s->dram);

    memory_region_init_ram(&s->sram, NULL, "omap1.sram", OMAP15XX_SRAM_SIZE, &error_fatal);
    memory_region_add_subregion(get_system_memory(), OMAP_IMIF_BASE, &s->sram);
}

static const MachineClass sx1_machine = {
    .name = "sx1",
    .alias = NULL,
    .desc = "Siemens SX1 (OMAP310) V2",
    .init = sx1_init,
    .cleanup = board_cleanup,
    .default_ram_size = 32 * MiB,
    /* no default_ram_id */
    .numa_mem_supported = false,
    .is_default = false,
    .no_numa_support = true,
};

bool sx1_machine_register(Error **errp)
{
    return hm_machine_class_register(&sx1_machine, errp);
}
