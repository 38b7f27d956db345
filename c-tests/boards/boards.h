/*
 * The boards of the small C VMM, written the way QEMU board code is, against hostmem.h.
 *
 * Each board lives in its own file and registers one MachineClass. Converting a board from
 * the legacy memory_region_allocate_system_memory() to machine->ram touches that file only.
 *
 * Board private state is malloc'd by the board's init and hung on machine->opaque; whoever
 * frees the machine calls hm_machine_free() (or board_machine_free()), and the class's cleanup
 * hook, board_cleanup(), releases the board state.
 */
#ifndef VMM_BOARDS_H
#define VMM_BOARDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hostmem.h"

#define KiB (1ULL << 10)
#define MiB (1ULL << 20)
#define GiB (1ULL << 30)

/*
 * Versioned machine types, the way QEMU's DEFINE_*_MACHINE macros make them: one init per
 * family, and a table of MachineClass entries, one per version, named "<family>-<major>.<minor>".
 * The versions are QEMU 10.0's, so the lifecycle rule is QEMU 10.0's too (include/hw/boards.h:
 * MACHINE_VER_DEPRECATION): a version three or more major releases old (7.0 and older) is
 * deprecated.
 */
#define BOARD_QEMU_VERSION_MAJOR 10
#define BOARD_QEMU_VERSION_MINOR 0

#define MACHINE_VER_STR(major, minor) #major "." #minor

#define MACHINE_VER_DEPRECATION_MSG \
    "machines more than 3 years old are subject to deletion after 6 years"

#define MACHINE_VER_IS_DEPRECATED(major, minor) \
    (BOARD_QEMU_VERSION_MAJOR - (major) > 3 || \
     (BOARD_QEMU_VERSION_MAJOR - (major) == 3 && BOARD_QEMU_VERSION_MINOR - (minor) >= 0))

/* The deprecation_reason of version major.minor: NULL while it is supported. */
#define MACHINE_VER_DEPRECATION(major, minor) \
    (MACHINE_VER_IS_DEPRECATED(major, minor) ? MACHINE_VER_DEPRECATION_MSG : NULL)

/* Registers each of a family's @n classes, in order; the first failure is returned. */
bool board_register_classes(const MachineClass *classes, size_t n, Error **errp);

/* Registration, one per board file. */
/* pc.c, q35.c, s390-ccw.c: every version of the family. */
bool pc_i440fx_machine_register(Error **errp);
bool pc_q35_machine_register(Error **errp);
bool s390_ccw_machine_register(Error **errp);
bool none_machine_register(Error **errp);
bool sx1_machine_register(Error **errp);
bool legacy_machine_register(Error **errp);
bool microbit_machine_register(Error **errp);
/* s390-ccw-qemu41.c: s390-ccw-virtio-4.1 and -4.0 with RAM as QEMU 4.1 allocated it. */
bool s390_ccw_qemu41_machine_register(Error **errp);

/*
 * registry.c: registers every board above but the QEMU 4.1 one; the first failure is returned.
 * registry-qemu41.c (vmm-qemu41): the QEMU 4.1 board and "none".
 */
bool boards_register_all(Error **errp);

/*
 * pc-common.c: the part of QEMU's hw/i386/pc.c both PC machines share: maps machine->ram through
 * "ram-below-4g" / "ram-above-4g" aliases, under a 2^64 "pci" container at priority -1 as QEMU
 * has it, after QEMU's checks of the CPU's address limit and of maxmem.
 */
#define PAM_REGIONS 13

typedef struct PCMemoryState {
    MemoryRegion ram_below_4g;
    MemoryRegion ram_above_4g;
    MemoryRegion pci;
    /* The host bridge's windows onto PCI below 1 MiB (i440FX and MCH alike). */
    MemoryRegion smram_region;
    MemoryRegion pam[PAM_REGIONS];
} PCMemoryState;

/* What differs between PC machine versions for the memory map (MachineClass.class_data). */
typedef struct PCMachineCompat {
    /*
     * <= 8.1 (QEMU's broken_32bit_mem_addr_check): a 32-bit CPU's highest used address is
     * taken to be its whole physical range, so the address check can never fail for it.
     */
    bool broken_32bit_mem_addr_check;
} PCMachineCompat;

extern const PCMachineCompat pc_compat_current;
extern const PCMachineCompat pc_compat_8_1;

/* QEMU's default CPU of both PC machines. */
#define PC_DEFAULT_CPU_TYPE "qemu64-x86_64-cpu"

/* The PC machines' own properties: max-ram-below-4g, with QEMU's setter checks. */
extern const MachineProperty pc_machine_properties[];

/* -machine max-ram-below-4g, or @dflt when it was not given or given as 0 (QEMU: "default"). */
uint64_t pc_max_ram_below_4g(const MachineState *machine, uint64_t dflt);

/*
 * Maps machine->ram with @below_4g bytes below 4 GiB and the rest above (at 4 GiB, or at
 * 1 TiB past the AMD HyperTransport range), the 64-bit PCI hole of @pci_hole64_size bytes
 * counting towards the CPU's address limit.
 */
void pc_memory_init(MachineState *machine, PCMemoryState *s, uint64_t below_4g,
                    uint64_t pci_hole64_size);

/*
 * pc_memory_init plus the host bridge's legacy windows and QEMU's firmware ROMs; the board
 * state goes to machine->opaque.
 */
void pc_board_init(MachineState *machine, uint64_t below_4g, uint64_t pci_hole64_size);

/*
 * s390-ccw.c: what the s390 machine types and the board that plays QEMU 4.1 share.
 * S390_RAM_CHUNK_MAX is QEMU 4.1's KVM_SLOT_MAX_BYTES: a KVM slot of 2^31 - 1 pages of
 * 4 KiB, rounded down to a 1 MiB segment (8 TiB - 1 MiB), the most one chunk of its main RAM
 * held.
 */
#define S390_RAM_CHUNK_MAX ((((1ULL << 31) - 1) * 4096) & ~(MiB - 1))
#define S390_RAM_CHUNK_PROPERTY "x-ram-chunk-size"

/* 4.2 and older: the RAM size rounded down to whole storage increments, with QEMU's message. */
uint64_t s390_fixup_ram_size(uint64_t sz);

/* The machine's x-ram-chunk-size (S390_RAM_CHUNK_MAX when not given), checked (a multiple of
 * 1 MiB up to S390_RAM_CHUNK_MAX). */
uint64_t s390_ram_chunk_size(MachineState *machine);

/* Chunk @i of main RAM named @base: "@base" for the first, "@base.@i" for the others. */
void s390_ram_chunk_name(char *buf, size_t len, const char *base, size_t i);

/* Frees the machine (hm_machine_free runs board_cleanup first). NULL is ignored. */
void board_machine_free(MachineState *ms);

/* MachineClass.cleanup of every board here: frees machine->opaque (board_new0 memory). */
void board_cleanup(MachineState *ms);

/*
 * QEMU's error_report() followed by exit(1), for the checks QEMU boards make in their init:
 * prints "<program>: <message>" on stderr.
 */
void board_fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/* QEMU's warn_report(): prints "<program>: warning: <message>" on stderr. */
void board_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* calloc that exits on failure, as g_new0 does. */
void *board_new0(size_t size);

#endif /* VMM_BOARDS_H */
