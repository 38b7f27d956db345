/*
 * A board not converted yet: it still allocates its main RAM with QEMU 4.2's
 * memory_region_allocate_system_memory(), which takes care of -mem-path and of NUMA memdevs
 * and registers the RAM for migration. It sets no default_ram_id, so the generic code leaves
 * machine->ram alone. Converting it means: drop the call, set default_ram_id = "legacy.ram",
 * map machine->ram (see none.c) — this file only.
 */
#include "boards.h"

typedef struct LegacyState {
    MemoryRegion ram;
} LegacyState;

static void legacy_init(MachineState *machine)
{
    LegacyState *s = board_new0(sizeof(*s));

    machine->opaque = s;
    memory_region_allocate_system_memory(&s->ram, NULL, "legacy.ram", machine->ram_size);
    memory_region_add_subregion(get_system_memory(), 0, &s->ram);
}

static const MachineClass legacy_machine = {
    .name = "legacy",
    .alias = NULL,
    .desc = "Board still calling memory_region_allocate_system_memory()",
    .init = legacy_init,
    .cleanup = board_cleanup,
    .default_ram_size = 128 * MiB,
    .default_ram_id = NULL,
    .numa_mem_supported = false,
    .is_default = false,
};

bool legacy_machine_register(Error **errp)
{
    return hm_machine_class_register(&legacy_machine, errp);
}
