/*
 * The PC memory map both PC machines share (the RAM part of QEMU's hw/i386/pc.c): main RAM
 * split around the PCI hole, the host bridge's legacy windows and the firmware ROMs.
 *
 * Main RAM is machine->ram, created by the generic code from -m / -mem-path / memory-backend
 * or the NUMA node backends; the board only decides where it shows in the guest.
 */
#include <inttypes.h>
#include <stdio.h>

#include "boards.h"

#define ACPI_MAX_RAM_SLOTS 256

/* Firmware as QEMU 10 loads it by default (SeaBIOS' 256 KiB image, the option ROM area). */
#define PC_BIOS_SIZE (256 * KiB)
#define PC_ROM_SIZE (128 * KiB)
#define PC_ROM_BASE 0xc0000
#define ISA_BIOS_SIZE (128 * KiB)

typedef struct PCFirmwareState {
    MemoryRegion bios;
    MemoryRegion isa_bios;
    MemoryRegion option_rom;
} PCFirmwareState;

typedef struct PCBoardState {
    PCMemoryState mem;
    PCFirmwareState fw;
} PCBoardState;

/*
 * Firmware ROMs where QEMU puts them (with SeaBIOS' 256 KiB image): "pc.bios" at the top of
 * 4 GiB, its last 128 KiB aliased as "isa-bios" below 1 MiB, and the 128 KiB "pc.rom" option
 * ROM area at 0xc0000. They cover RAM in the flat view exactly as in QEMU.
 */
static void pc_firmware_init(PCMemoryState *mem, PCFirmwareState *fw)
{
    memory_region_init_ram(&fw->bios, NULL, "pc.bios", PC_BIOS_SIZE, &error_fatal);
    memory_region_set_readonly(&fw->bios, true);
    memory_region_add_subregion(&mem->pci, 4 * GiB - PC_BIOS_SIZE, &fw->bios);

    memory_region_init_alias(&fw->isa_bios, NULL, "isa-bios", &fw->bios,
                             PC_BIOS_SIZE - ISA_BIOS_SIZE, ISA_BIOS_SIZE);
    memory_region_add_subregion_overlap(&mem->pci, 1 * MiB - ISA_BIOS_SIZE,
                                        &fw->isa_bios, 1);
    memory_region_set_readonly(&fw->isa_bios, true);

    memory_region_init_ram(&fw->option_rom, NULL, "pc.rom", PC_ROM_SIZE, &error_fatal);
    memory_region_set_readonly(&fw->option_rom, true);
    memory_region_add_subregion_overlap(&mem->pci, PC_ROM_BASE, &fw->option_rom, 1);
}

const PCMachineCompat pc_compat_current = { .broken_32bit_mem_addr_check = false };
const PCMachineCompat pc_compat_8_1 = { .broken_32bit_mem_addr_check = true };

/* QEMU's pc_machine_set_max_ram_below_4g: at most 4 GiB; below 1 MiB only a warning. */
static bool pc_check_max_ram_below_4g(const MachineClass *mc, const char *name, uint64_t value,
                                      Error **errp)
{
    char msg[128];

    (void)mc;
    (void)name;
    if (value > 4 * GiB) {
        snprintf(msg, sizeof(msg),
                 "Machine option 'max-ram-below-4g=%" PRIu64
                 "' expects size less than or equal to 4G", value);
        hm_error_set(errp, msg);
        return false;
    }
    if (value < 1 * MiB) {
        /* QEMU's words, without a space after the comma. */
        board_warn("Only %" PRIu64 " bytes of RAM below the 4GiB boundary,"
                   "BIOS may not work with less than 1MiB", value);
    }
    return true;
}

const MachineProperty pc_machine_properties[] = {
    { .name = "max-ram-below-4g", .kind = HM_PROPERTY_KIND_SIZE, .check = pc_check_max_ram_below_4g },
    { .name = NULL },
};

uint64_t pc_max_ram_below_4g(const MachineState *machine, uint64_t dflt)
{
    uint64_t value = 0;

    if (!hm_machine_get_property(machine, "max-ram-below-4g", &value) || value == 0) {
        return dflt;
    }
    return value;
}

/*
 * The HyperTransport range AMD hosts with an IOMMU reserve just below 1 TiB: an AMD vCPU's RAM
 * above 4 GiB moves past it when the highest address the guest may use would reach it.
 */
#define AMD_HT_START 0xfd00000000ULL
#define AMD_ABOVE_1TB_START 0x10000000000ULL

/* Where RAM above 4 GiB sits, and the sizes the highest used address depends on. */
typedef struct PCAddressMap {
    const MachineState *machine;
    uint64_t above_4g_start;
    uint64_t above_4g_size;
    uint64_t pci_hole64_size;
} PCAddressMap;

/* QEMU's ROUND_UP, wrapping at 2^64 as QEMU's does. */
static uint64_t round_up(uint64_t n, uint64_t align)
{
    return (n + align - 1) & ~(align - 1);
}

static bool pc_has_device_memory(const MachineState *machine)
{
    return machine->ram_size < machine->maxram_size;
}

/* The hotplug area after RAM: maxmem's rest plus 1 GiB per slot, from the next gigabyte. */
static void pc_device_memory_range(const PCAddressMap *map, uint64_t *base, uint64_t *size)
{
    const MachineState *machine = map->machine;

    *size = machine->maxram_size - machine->ram_size + GiB * machine->ram_slots;
    *base = round_up(map->above_4g_start + map->above_4g_size, GiB);
}

static uint64_t pc_pci_hole64_start(const PCAddressMap *map)
{
    uint64_t start = map->above_4g_start + map->above_4g_size;
    uint64_t base, size;

    if (pc_has_device_memory(map->machine)) {
        pc_device_memory_range(map, &base, &size);
        start = base + size;
    }
    return round_up(start, GiB);
}

/* QEMU's pc_max_used_gpa: the highest guest address RAM, hotplug memory or the hole reach. */
static uint64_t pc_max_used_gpa(const PCAddressMap *map)
{
    const MachineState *machine = map->machine;
    const PCMachineCompat *compat = machine->mc->class_data;
    uint64_t base, size;

    if (machine->cpu_long_mode) {
        return pc_pci_hole64_start(map) + map->pci_hole64_size - 1;
    }
    if (compat && compat->broken_32bit_mem_addr_check) {
        return (1ULL << machine->cpu_phys_bits) - 1;
    }
    if (pc_has_device_memory(machine)) {
        pc_device_memory_range(map, &base, &size);
        return base + size - 1;
    }
    return map->above_4g_start + map->above_4g_size - 1;
}

void pc_memory_init(MachineState *machine, PCMemoryState *s, uint64_t below_4g,
                    uint64_t pci_hole64_size)
{
    MemoryRegion *system_memory = get_system_memory();
    PCAddressMap map = {
        .machine = machine,
        .above_4g_start = 4 * GiB,
        .above_4g_size = machine->ram_size - below_4g,
        .pci_hole64_size = pci_hole64_size,
    };
    uint64_t max_used, max_phys;

    /*
     * Every PC version vmm offers (7.1 and later) enforces the hole; QEMU's 7.0 and older,
     * which keep RAM at 4 GiB, are not offered.
     */
    if (machine->cpu_vendor_amd && pc_max_used_gpa(&map) >= AMD_HT_START) {
        map.above_4g_start = AMD_ABOVE_1TB_START;
    }

    max_used = pc_max_used_gpa(&map);
    max_phys = machine->cpu_phys_bits >= 64 ? UINT64_MAX : (1ULL << machine->cpu_phys_bits) - 1;
    if (max_phys < max_used) {
        board_fatal("Address space limit 0x%" PRIx64 " < 0x%" PRIx64 " phys-bits too low (%u)",
                    max_phys, max_used, machine->cpu_phys_bits);
    }

    memory_region_init(&s->pci, NULL, "pci", UINT64_MAX);
    memory_region_add_subregion_overlap(system_memory, 0, &s->pci, -1);

    memory_region_init_alias(&s->ram_below_4g, NULL, "ram-below-4g", machine->ram,
                             0, below_4g);
    memory_region_add_subregion(system_memory, 0, &s->ram_below_4g);
    if (map.above_4g_size > 0) {
        memory_region_init_alias(&s->ram_above_4g, NULL, "ram-above-4g", machine->ram,
                                 below_4g, map.above_4g_size);
        memory_region_add_subregion(system_memory, map.above_4g_start, &s->ram_above_4g);
    }

    if (pc_has_device_memory(machine)) {
        uint64_t base, size;

        /* ACPI describes at most 256 hotpluggable memory slots. */
        if (machine->ram_slots > ACPI_MAX_RAM_SLOTS) {
            board_fatal("unsupported amount of memory slots: %" PRIu64, machine->ram_slots);
        }
        /* QEMU's words ("must by"), its target page being 4 KiB. */
        if (machine->maxram_size & (4 * KiB - 1)) {
            board_fatal("maximum memory size must by aligned to multiple of %d bytes",
                        (int)(4 * KiB));
        }
        pc_device_memory_range(&map, &base, &size);
        if (base + size < size) {
            board_fatal("unsupported amount of maximum memory: %" PRIx64, machine->maxram_size);
        }
    }
}

/*
 * The host bridge's windows below 1 MiB in their reset state: the SMRAM window and the PAM
 * segments (twelve of 16 KiB from 0xc0000, one of 64 KiB at 0xf0000) all show PCI, at
 * priority 1 over RAM. That is why the option ROM and the ISA BIOS cover RAM there.
 */
static void pc_host_bridge_windows_init(PCMemoryState *s)
{
    MemoryRegion *system_memory = get_system_memory();
    uint64_t start = 0xc0000;
    int i;

    memory_region_init_alias(&s->smram_region, NULL, "smram-region", &s->pci,
                             0xa0000, 0x20000);
    memory_region_add_subregion_overlap(system_memory, 0xa0000, &s->smram_region, 1);

    for (i = 0; i < PAM_REGIONS; i++) {
        uint64_t size = i == PAM_REGIONS - 1 ? 64 * KiB : 16 * KiB;

        memory_region_init_alias(&s->pam[i], NULL, "pam-pci", &s->pci, start, size);
        memory_region_add_subregion_overlap(system_memory, start, &s->pam[i], 1);
        start += size;
    }
}

/* Shared by pc and q35: the memory map, the host bridge windows and the firmware ROMs. */
void pc_board_init(MachineState *machine, uint64_t below_4g, uint64_t pci_hole64_size)
{
    PCBoardState *s = board_new0(sizeof(*s));

    machine->opaque = s;
    pc_memory_init(machine, &s->mem, below_4g, pci_hole64_size);
    pc_host_bridge_windows_init(&s->mem);
    pc_firmware_init(&s->mem, &s->fw);
}
