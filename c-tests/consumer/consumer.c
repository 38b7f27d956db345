/*
 * A VMM outside hostmem's tree, as a consumer writes one: it includes hostmem.h, links
 * libhostmem.a through pkg-config or a meson subproject, and has one board of its own, whose
 * RAM is machine->ram (a backend hostmem creates from -m / -object / -machine memory-backend).
 *
 * usage: consumer [QEMU options]   e.g.  consumer -m 256M -accel kvm
 * Prints the board's memory map and KVM memslots; with the test guest in the library, a vCPU
 * then checks every slot from inside the guest.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <hostmem.h>

static void consumer_init(MachineState *machine)
{
    memory_region_add_subregion(get_system_memory(), 0, machine->ram);
}

static const MachineClass consumer_machine = {
    .name = "consumer",
    .desc = "a board outside hostmem's tree",
    .init = consumer_init,
    .default_ram_size = 128ULL << 20,
    .default_ram_id = "consumer.ram",
    .is_default = true,
    .no_numa_support = true,
};

static bool show(MachineState *ms, const char *command)
{
    Error *err = NULL;
    char *out = hm_hmp(ms, command, &err);

    if (!out) {
        error_report_err(err);
        return false;
    }
    printf("(qemu) %s\n%s", command, out);
    hm_free(out);
    return true;
}

int main(int argc, char **argv)
{
    Error *err = NULL;
    MachineState *ms;
    bool ok;

    printf("hostmem %s\n", hm_version());
    if (strcmp(hm_version(), HOSTMEM_VERSION_STRING) != 0) {
        fprintf(stderr, "consumer: built against hostmem %s, linked with %s\n",
                HOSTMEM_VERSION_STRING, hm_version());
        return 1;
    }
    if (!hm_machine_class_register(&consumer_machine, &err)) {
        error_report_err(err);
        return 1;
    }
    ms = hm_machine_new_from_argv(argc, (const char *const *)argv, &err);
    if (!ms) {
        error_report_err(err);
        return 1;
    }
    ok = show(ms, "info ramblock") && show(ms, "info memslots");
#ifdef HOSTMEM_TEST_GUEST
    if (ok && ms->accel_kvm) {
        HmGuestCheck check;

        ok = hm_kvm_guest_check(&check, &err);
        if (ok) {
            printf("guest check: ok (%llu slots)\n", (unsigned long long)check.slots);
        } else {
            error_report_err(err);
        }
    }
#endif
    hm_machine_free(ms);
    return ok ? 0 : 1;
}
