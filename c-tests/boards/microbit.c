/*
 * A pre-QOM style board, modelled on QEMU's "microbit" (BBC micro:bit, nRF51 SoC;
 * hw/arm/microbit.c, hw/arm/nrf51_soc.c): the SoC maps its own fixed SRAM and flash with
 * memory_region_init_ram. There is no default_ram_id, so -m, -mem-path and -mem-prealloc do
 * not change this RAM, as in QEMU. (QEMU's flash is a ROM device; here plain RAM.)
 */
#include "boards.h"

#define NRF51_SRAM_BASE 0x20000000
#define NRF51_SRAM_SIZE (16 * KiB)
#define NRF51_FLASH_BASE 0x00000000
#define NRF51_FLASH_SIZE (256 * KiB)

typedef struct MicrobitState {
    MemoryRegion sram;
    MemoryRegion flash;
} MicrobitState;

static void microbit_init(MachineState *machine)
{
    MicrobitState *s = board_new0(sizeof(*s));

    machine->opaque = s;
    /* Same creation order as the SoC's realize, which decides the RAMBlock offsets. */
    memory_region_init_ram(&s->sram, NULL, "nrf51.sram", NRF51_SRAM_SIZE, &error_fatal);
    memory_region_add_subregion(get_system_memory(), NRF51_SRAM_BASE, &s->sram);
    memory_region_init_ram(&s->flash, NULL, "nrf51_soc.flash", NRF51_FLASH_SIZE,
                           &error_fatal);
    memory_region_add_subregion(get_system_memory(), NRF51_FLASH_BASE, &s->flash);
}

static const MachineClass microbit_machine = {
    .name = "microbit",
    .alias = NULL,
    .desc = "BBC micro:bit (Cortex-M0)",
    .init = microbit_init,
    .cleanup = board_cleanup,
    .default_ram_size = 128 * MiB,
    .default_ram_id = NULL,
    .numa_mem_supported = false,
    .is_default = false,
    .no_numa_support = true,
};

bool microbit_machine_register(Error **errp)
{
    return hm_machine_class_register(&microbit_machine, errp);
}
