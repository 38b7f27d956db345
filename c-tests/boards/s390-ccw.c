/*
 * The s390x machine types "s390-ccw-virtio-X.Y", memory part (QEMU's hw/s390x/s390-virtio-ccw.c):
 * main RAM, one backend, at guest address 0. One init per RAM layout, a table of versions.
 *
 * QEMU 10.0 offers 2.9 to 10.0; these are 4.0 to 10.0 (7.0 and older deprecated). Their RAM
 * differences:
 * - size: 4.2 and older round the size down to whole storage increments, as their SCLP did
 *   (s390_fixup_ram_size); newer ones refuse sizes that are not whole MiB.
 * - layout: QEMU 4.1 and older gave a guest larger than one KVM slot could hold several
 *   RAMBlocks, "s390.ram", "s390.ram.1", ..., each at most S390_RAM_CHUNK_MAX (8 TiB - 1 MiB).
 *   QEMU 4.2 made it one "s390.ram" and split only the KVM slots (at 4 TiB); QEMU 10's 4.1
 *   and 4.0 lay RAM out as 4.2 does, so an old guest above 8 TiB cannot come over. Here 4.1
 *   and 4.0 keep QEMU 4.1's stream with one backend: main RAM is mapped through aliases of at
 *   most one chunk each, registered for migration (migratable aliases, as proposed on
 *   qemu-devel in 2019), and KVM slots are cut at the chunk size, one per chunk as in 4.1.
 *   A guest of one chunk or less is mapped whole, as both QEMU 4.1 and 10 map it. The
 *   machine property x-ram-chunk-size lowers the chunk size, to test the layout without a
 *   9 TiB guest.
 * Older versions are left out: 3.1 and older name file and memfd backends' RAMBlocks
 * "/objects/<id>" (hw_compat_3_1), 3.0 and older refuse 1 MiB huge pages.
 *
 * Unlike in QEMU's s390x binary, s390-ccw-virtio-10.0 is not vmm's default machine: vmm has
 * every board, and its default is "pc".
 */
#include <inttypes.h>
#include <stdio.h>

#include "boards.h"

/* The SCLP of old machine types reports at most this many storage increments (sclp.h). */
#define MAX_STORAGE_INCREMENTS 1020

/* QEMU 4.2 and newer cut s390 KVM slots at 4 TiB (target/s390x/kvm: an aligned split point). */
#define S390_KVM_SLOT_MAX (4ULL << 40)

/* The state of a board that maps RAM in chunks: the chunks' alias regions. */
typedef struct S390ChunkedState {
    size_t nr_chunks;
    MemoryRegion chunks[];
} S390ChunkedState;

static void s390_check_ram_size(MachineState *machine)
{
    /* Since 5.0 the SCLP reports memory in 1 MiB increments, so other sizes are refused. */
    if (machine->ram_size % MiB) {
        board_fatal("ram size must be multiples of 1 MiB");
    }
}

/* 4.2 and newer: main RAM whole at 0, one RAMBlock; KVM slots of at most 4 TiB. */
static void s390_memory_init(MachineState *machine)
{
    s390_check_ram_size(machine);
    memory_region_add_subregion(get_system_memory(), 0, machine->ram);
    kvm_set_max_memslot_size(S390_KVM_SLOT_MAX);
}

uint64_t s390_ram_chunk_size(MachineState *machine)
{
    uint64_t chunk;

    /* Not given: QEMU 4.1's chunk size. */
    if (!hm_machine_get_property(machine, S390_RAM_CHUNK_PROPERTY, &chunk)) {
        chunk = S390_RAM_CHUNK_MAX;
    }
    if (chunk == 0 || chunk % MiB || chunk > S390_RAM_CHUNK_MAX) {
        board_fatal("%s 0x%" PRIx64 " must be a multiple of 1 MiB from 1 MiB to 0x%llx",
                    S390_RAM_CHUNK_PROPERTY, chunk, S390_RAM_CHUNK_MAX);
    }
    return chunk;
}

void s390_ram_chunk_name(char *buf, size_t len, const char *base, size_t i)
{
    if (i == 0) {
        snprintf(buf, len, "%s", base);
    } else {
        snprintf(buf, len, "%s.%zu", base, i);
    }
}

/*
 * 4.1 and older: QEMU 4.1's stream over one backend. A guest larger than one chunk is mapped
 * through aliases of main RAM, one per chunk, named after main RAM's block ("s390.ram",
 * "s390.ram.1", ...) and registered for migration, which takes main RAM's own block out of
 * the stream. KVM slots are cut at the chunk size, so each chunk gets its own slots as in 4.1.
 */
static void s390_memory_init_chunked(MachineState *machine)
{
    uint64_t chunk, offset;
    size_t i, n;
    S390ChunkedState *s;
    char name[300];

    s390_check_ram_size(machine);
    chunk = s390_ram_chunk_size(machine);
    kvm_set_max_memslot_size(chunk);
    if (machine->ram_size <= chunk) {
        memory_region_add_subregion(get_system_memory(), 0, machine->ram);
        return;
    }
    n = (machine->ram_size + chunk - 1) / chunk;
    s = board_new0(sizeof(*s) + n * sizeof(s->chunks[0]));
    s->nr_chunks = n;
    machine->opaque = s;
    for (i = 0, offset = 0; i < n; i++, offset += chunk) {
        uint64_t size = machine->ram_size - offset < chunk ? machine->ram_size - offset : chunk;

        s390_ram_chunk_name(name, sizeof(name), memory_region_name(machine->ram), i);
        memory_region_init_alias(&s->chunks[i], NULL, name, machine->ram, offset, size);
        vmstate_register_ram_global(&s->chunks[i]);
        memory_region_add_subregion(get_system_memory(), offset, &s->chunks[i]);
    }
}

/*
 * 4.2 and older: the RAM size is rounded down to whole storage increments, starting at 1 MiB
 * and doubling the increment until at most MAX_STORAGE_INCREMENTS are needed. QEMU says so
 * with qemu_printf, which goes to stdout while the command line is read.
 */
uint64_t s390_fixup_ram_size(uint64_t sz)
{
    int increment_size = 20;
    uint64_t newsz;

    while ((sz >> increment_size) > MAX_STORAGE_INCREMENTS) {
        increment_size++;
    }
    newsz = sz >> increment_size << increment_size;

    if (sz != newsz) {
        printf("Ram size %" PRIu64 "MB was fixed up to %" PRIu64
               "MB to match machine restrictions. Consider updating "
               "the guest definition.\n", (uint64_t)(sz / MiB), (uint64_t)(newsz / MiB));
    }
    return newsz;
}

/* The property of the chunked layout (its default, QEMU 4.1's chunk size, is applied by
 * s390_ram_chunk_size). */
static const MachineProperty s390_chunked_properties[] = {
    { .name = S390_RAM_CHUNK_PROPERTY, .kind = HM_PROPERTY_KIND_SIZE },
    { .name = NULL },
};

/* QEMU's DEFINE_CCW_MACHINE_IMPL: the description names the version. */
#define CCW_MACHINE(major, minor, alias_, fixup_, init_, props_)                   \
    {                                                                              \
        .name = "s390-ccw-virtio-" MACHINE_VER_STR(major, minor),                  \
        .alias = alias_,                                                           \
        .desc = "Virtual s390x machine (version " MACHINE_VER_STR(major, minor) ")", \
        .init = init_,                                                             \
        .cleanup = board_cleanup,                                                  \
        .default_ram_size = 128 * MiB,                                             \
        .default_ram_id = "s390.ram",                                              \
        .numa_mem_supported = false,                                               \
        .is_default = false,                                                       \
        .no_numa_support = true,                                                   \
        .deprecation_reason = MACHINE_VER_DEPRECATION(major, minor),               \
        .fixup_ram_size = fixup_,                                                  \
        .properties = props_,                                                      \
    }

static const MachineClass s390_ccw_machines[] = {
    CCW_MACHINE(10, 0, "s390-ccw-virtio", NULL, s390_memory_init, NULL),
    CCW_MACHINE(9, 2, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(9, 1, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(9, 0, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(8, 2, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(8, 1, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(8, 0, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(7, 2, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(7, 1, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(7, 0, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(6, 2, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(6, 1, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(6, 0, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(5, 2, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(5, 1, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(5, 0, NULL, NULL, s390_memory_init, NULL),
    CCW_MACHINE(4, 2, NULL, s390_fixup_ram_size, s390_memory_init, NULL),
    CCW_MACHINE(4, 1, NULL, s390_fixup_ram_size, s390_memory_init_chunked, s390_chunked_properties),
    CCW_MACHINE(4, 0, NULL, s390_fixup_ram_size, s390_memory_init_chunked, s390_chunked_properties),
};

bool s390_ccw_machine_register(Error **errp)
{
    return board_register_classes(s390_ccw_machines,
                                  sizeof(s390_ccw_machines) / sizeof(s390_ccw_machines[0]),
                                  errp);
}
