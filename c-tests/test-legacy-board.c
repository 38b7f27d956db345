/*
 * The legacy memory_region_allocate_system_memory() contract QEMU documented but never
 * enforced: one call per machine. A second call on the same machine is refused with an error
 * (the exiting form exits 1 with the message, as QEMU's legacy call does on failure).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "boards/boards.h"
#include "test-util.h"


typedef struct TwiceState {
    MemoryRegion ram;
    MemoryRegion again;
} TwiceState;

static bool first_ok, second_ok;
static char *second_error;

static void twice_init(MachineState *machine)
{
    TwiceState *s = board_new0(sizeof(*s));
    Error *err = NULL;

    machine->opaque = s;
    first_ok = hm_memory_region_allocate_system_memory(&s->ram, NULL, "twice.ram",
                                                       machine->ram_size, &err);
    hm_error_clear(&err);
    second_ok = hm_memory_region_allocate_system_memory(&s->again, NULL, "twice.ram2",
                                                        machine->ram_size, &err);
    second_error = err ? strdup(error_get_pretty(err)) : NULL;
    hm_error_clear(&err);
}

static void twice_exit_init(MachineState *machine)
{
    TwiceState *s = board_new0(sizeof(*s));

    machine->opaque = s;
    memory_region_allocate_system_memory(&s->ram, NULL, "twice.ram", machine->ram_size);
    memory_region_allocate_system_memory(&s->again, NULL, "twice.ram2", machine->ram_size);
    /* Not reached: the second call exits. */
    _exit(42);
}

static const MachineClass twice_machine = {
    .name = "legacy-twice",
    .desc = "calls memory_region_allocate_system_memory twice (error form)",
    .init = twice_init,
    .cleanup = board_cleanup,
    .default_ram_size = 16 * MiB,
};

static const MachineClass twice_exit_machine = {
    .name = "legacy-twice-exit",
    .desc = "calls memory_region_allocate_system_memory twice",
    .init = twice_exit_init,
    .cleanup = board_cleanup,
    .default_ram_size = 16 * MiB,
};

static MachineState *machine_new(const char *type)
{
    const char *argv[] = { "test-legacy-board", "-M", type, NULL };
    Error *err = NULL;
    MachineState *ms = hm_machine_new_from_argv(3, argv, &err);

    if (!ms) {
        /* A board misusing the memory API may fail the whole machine: that is a refusal too. */
        hm_error_clear(&err);
    }
    return ms;
}

static void test_second_call_is_refused(void)
{
    MachineState *ms = machine_new("legacy-twice");

    CHECK(first_ok);
    CHECK(!second_ok);
    CHECK(second_error != NULL);
    if (second_error) {
        CHECK(strstr(second_error, "memory_region_allocate_system_memory") != NULL);
    }
    free(second_error);
    board_machine_free(ms);
}

static void test_second_call_exits(void)
{
    int status;
    pid_t pid = fork();

    if (pid == 0) {
        /* Quiet child: the message is QEMU-style on stderr; only the exit status matters. */
        if (!freopen("/dev/null", "w", stderr)) {
            _exit(3);
        }
        machine_new("legacy-twice-exit");
        _exit(2);
    }
    CHECK(pid > 0);
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 1);
}

int main(void)
{
    Error *err = NULL;

    if (!hm_machine_class_register(&twice_machine, &err) ||
        !hm_machine_class_register(&twice_exit_machine, &err)) {
        error_report_err(err);
        return 1;
    }
    test_second_call_is_refused();
    test_second_call_exits();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
