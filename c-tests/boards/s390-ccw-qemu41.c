/*
 * s390-ccw-virtio-4.1 and -4.0 as QEMU 4.1 itself laid their RAM out: the old side of a
 * migration to and from hostmem's own 4.1 (s390-ccw.c). A guest larger than one chunk
 * (S390_RAM_CHUNK_MAX, or the machine's x-ram-chunk-size) gets one RAM region per chunk,
 * each allocated on its own, mapped at its running offset and registered for migration as
 * "s390.ram", "s390.ram.1", ...
 *
 * QEMU 4.1 allocated each chunk with memory_region_allocate_system_memory(), called once per
 * chunk against that function's "exactly once" contract. hostmem refuses a second call, so
 * each chunk here is an ordinary memory_region_init_ram(): anonymous memory, reserved lazily,
 * registered for migration under its name, which is what 4.1's calls amounted to without
 * -mem-path. -mem-path (4.1 backed each chunk with a file) is not modelled, and
 * -machine memory-backend (4.1 had none) is refused.
 *
 * The s390-ccw-virtio family registers the same names, so this board lives in a VMM of its
 * own, vmm-qemu41 (registry-qemu41.c).
 */
#include <stdio.h>

#include "boards.h"

typedef struct S390Qemu41State {
    size_t nr_chunks;
    MemoryRegion chunks[];
} S390Qemu41State;

static void s390_qemu41_memory_init(MachineState *machine)
{
    uint64_t chunk = s390_ram_chunk_size(machine), offset;
    size_t i, n = (machine->ram_size + chunk - 1) / chunk;
    S390Qemu41State *s;
    char name[64];
    Error *err = NULL;

    if (machine->ram) {
        board_fatal("this board plays QEMU 4.1, which had no -machine memory-backend");
    }
    s = board_new0(sizeof(*s) + n * sizeof(s->chunks[0]));
    s->nr_chunks = n;
    machine->opaque = s;
    for (i = 0, offset = 0; i < n; i++, offset += chunk) {
        uint64_t size = machine->ram_size - offset < chunk ? machine->ram_size - offset : chunk;

        s390_ram_chunk_name(name, sizeof(name), "s390.ram", i);
        if (!memory_region_init_ram(&s->chunks[i], NULL, name, size, &err)) {
            board_fatal("%s", error_get_pretty(err));
        }
        memory_region_add_subregion(get_system_memory(), offset, &s->chunks[i]);
    }
}

/* x-ram-chunk-size; s390_ram_chunk_size applies its default, QEMU 4.1's chunk size. */
static const MachineProperty s390_qemu41_properties[] = {
    { .name = S390_RAM_CHUNK_PROPERTY, .kind = HM_PROPERTY_KIND_SIZE },
    { .name = NULL },
};

/* No default_ram_id: the generic code makes no backend, the board allocates (as in 4.1). */
#define QEMU41_CCW_MACHINE(major, minor)                                            \
    {                                                                              \
        .name = "s390-ccw-virtio-" MACHINE_VER_STR(major, minor),                  \
        .desc = "Virtual s390x machine (version " MACHINE_VER_STR(major, minor)     \
                ", RAM as QEMU 4.1 laid it out)",                                  \
        .init = s390_qemu41_memory_init,                                           \
        .cleanup = board_cleanup,                                                  \
        .default_ram_size = 128 * MiB,                                             \
        .no_numa_support = true,                                                   \
        .deprecation_reason = MACHINE_VER_DEPRECATION(major, minor),               \
        .fixup_ram_size = s390_fixup_ram_size,                                     \
        .properties = s390_qemu41_properties,                                      \
    }

static const MachineClass s390_qemu41_machines[] = {
    QEMU41_CCW_MACHINE(4, 1),
    QEMU41_CCW_MACHINE(4, 0),
};

bool s390_ccw_qemu41_machine_register(Error **errp)
{
    return board_register_classes(s390_qemu41_machines,
                                  sizeof(s390_qemu41_machines) / sizeof(s390_qemu41_machines[0]),
                                  errp);
}
