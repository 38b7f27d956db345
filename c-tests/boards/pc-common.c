/*
 * The PC memory map both PC machines share (the RAM part of QEMU's hw/i386/pc.c): main RAM
 * split around the PCI hole, the host bridge's legacy windows and the firmware ROMs.
 *
 * Main RAM is machine->ram, created by the generic code from -m / -mem-path / memory-backend
 * or the NUMA node backends; the board only decides where it shows in the guest.
 */
#include <inttypes.h>

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

void pc_memory_init(MachineState *machine, PCMemoryState *s, uint64_t lowmem)
{
    MemoryRegion *system_memory = get_system_memory();
    uint64_t below_4g = machine->ram_size < lowmem ? machine->ram_size : lowmem;
    uint64_t above_4g = machine->ram_size - below_4g;

    /* ACPI describes at most 256 hotpluggable memory slots. */
    if (machine->ram_slots > ACPI_MAX_RAM_SLOTS) {
        board_fatal("unsupported amount of memory slots: %" PRIu64, machine->ram_slots);
    }

    memory_region_init(&s->pci, NULL, "pci", UINT64_MAX);
    memory_region_add_subregion_overlap(system_memory, 0, &s->pci, -1);

    memory_region_init_alias(&s->ram_below_4g, NULL, "ram-below-4g", machine->ram,
                             0, below_4g);
    memory_region_add_subregion(system_memory, 0, &s->ram_below_4g);
    if (above_4g > 0) {
        memory_region_init_alias(&s->ram_above_4g, NULL, "ram-above-4g", machine->ram,
                                 below_4g, above_4g);
        memory_region_add_subregion(system_memory, 4 * GiB, &s->ram_above_4g);
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
void pc_board_init(MachineState *machine, uint64_t lowmem)
{
    PCBoardState *s = board_new0(sizeof(*s));

    machine->opaque = s;
    pc_memory_init(machine, &s->mem, lowmem);
    pc_host_bridge_windows_init(&s->mem);
    pc_firmware_init(&s->mem, &s->fw);
}
