/*
 * A VMM that makes its VM itself (as kvmtool does: VM, irqchip and vCPUs before RAM) and keeps
 * slots of its own hands the VM to hostmem with hm_kvm_attach_vm_fd: hostmem's RAM slots never
 * take the VMM's numbers, numbers the VMM asks for later are never hostmem's, and a descriptor
 * that is no VM is refused by name.
 *
 * Without /dev/kvm the test is skipped (exit 77), except under CI=true where it fails.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../test-util.h"

static int vmm_slot(int vm, uint32_t slot, uint64_t gpa, void *host, uint64_t size)
{
    struct kvm_userspace_memory_region r = {
        .slot = slot, .guest_phys_addr = gpa, .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)host,
    };

    return ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r);
}

static int slot_of(uint64_t gpa)
{
    HmKvmSlot s[16];
    size_t n = hm_kvm_get_slots(s, 16);

    for (size_t i = 0; i < n && i < 16; i++) {
        if (s[i].gpa == gpa) {
            return (int)s[i].slot;
        }
    }
    return -1;
}

static MemoryRegion *ram_at(const char *id, uint64_t gpa, uint64_t size, HostMemoryBackend **out)
{
    Error *err = NULL;
    HmBackendConfig cfg = { .kind = HM_BACKEND_KIND_RAM, .id = id, .size = size };
    HostMemoryBackend *b = hm_memory_backend_create(&cfg, &err);
    MemoryRegion *mr;

    CHECK(b != NULL);
    if (!b) {
        error_free(err);
        exit(1);
    }
    mr = host_memory_backend_get_memory(b);
    host_memory_backend_set_mapped(b, true);
    CHECK(hm_memory_region_add_subregion_err(get_system_memory(), gpa, mr, &err));
    *out = b;
    return mr;
}

int main(void)
{
    Error *err = NULL;
    const char *ci = getenv("CI");
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC), vm, extra, hostmem_slot;
    uint32_t mine[] = { 0 };
    void *fb;
    HostMemoryBackend *low, *high;
    MemoryRegion *low_mr, *high_mr;

    if (kvm < 0) {
        fprintf(stderr, "no /dev/kvm\n");
        return ci && strcmp(ci, "true") == 0 ? 1 : 77;
    }
    vm = ioctl(kvm, KVM_CREATE_VM, 0);
    CHECK(vm >= 0);
    /* The VMM's own framebuffer in slot 0, before hostmem knows of the VM. */
    fb = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(fb != MAP_FAILED && vmm_slot(vm, 0, 0xfd000000, fb, 2 << 20) == 0);

    low_mr = ram_at("low", 0, 64 * MiB, &low);

    /* Not a VM: said by number, nothing attached. */
    CHECK(!hm_kvm_attach_vm_fd(kvm, 0, NULL, 0, &err));
    {
        char want[64];

        snprintf(want, sizeof(want), "fd %d is not a KVM VM: Invalid argument", kvm);
        CHECK(err && strcmp(error_get_pretty(err), want) == 0);
    }
    CHECK(err && hm_error_get_class(err) == HM_ERROR_CLASS_INVALID_PARAMETER);
    error_free(err);
    err = NULL;
    CHECK(!hm_kvm_attach_vm_fd(1000, 0, NULL, 0, &err));
    CHECK(err && strcmp(error_get_pretty(err), "fd 1000 is not a KVM VM: Bad file descriptor") == 0);
    error_free(err);
    err = NULL;
    CHECK(!hm_kvm_enabled());

    CHECK(hm_kvm_attach_vm_fd(vm, 0, mine, 1, &err));
    CHECK(!err);
    CHECK(hm_kvm_enabled());
    hostmem_slot = slot_of(0);
    CHECK(hostmem_slot > 0);

    /* A number for a device BAR: neither the VMM's first nor hostmem's. */
    extra = (int)hm_kvm_slot_alloc(&err);
    CHECK(!err && extra > 0 && extra != hostmem_slot);
    {
        void *bar = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

        CHECK(vmm_slot(vm, (uint32_t)extra, 0xfe000000, bar, 1 << 20) == 0);
        /* RAM added later avoids all three numbers. */
        high_mr = ram_at("high", 4 * GiB, 32 * MiB, &high);
        CHECK(slot_of(4 * GiB) >= 0 && slot_of(4 * GiB) != 0 && slot_of(4 * GiB) != extra &&
              slot_of(4 * GiB) != hostmem_slot);
        CHECK(!hm_kvm_slot_reserve((uint32_t)hostmem_slot, &err));
        CHECK(err && strstr(error_get_pretty(err), "is in use by hostmem"));
        error_free(err);
        err = NULL;
        CHECK(!hm_kvm_slot_reserve(0, &err));
        CHECK(err && strcmp(error_get_pretty(err), "KVM slot 0 is already reserved for the VMM") == 0);
        error_free(err);
        err = NULL;
        CHECK(!hm_kvm_slot_reserve(1u << 20, &err));
        CHECK(err && hm_error_get_class(err) == HM_ERROR_CLASS_INVALID_PARAMETER);
        error_free(err);
        err = NULL;
        CHECK(vmm_slot(vm, (uint32_t)extra, 0xfe000000, bar, 0) == 0);
        CHECK(hm_kvm_slot_release((uint32_t)extra));
        CHECK(!hm_kvm_slot_release((uint32_t)extra));
        munmap(bar, 1 << 20);
    }
    CHECK(!hm_kvm_attach_vm_fd(vm, 0, NULL, 0, &err));
    CHECK(err && strcmp(error_get_pretty(err), "KVM is already attached to this machine") == 0);
    error_free(err);
    err = NULL;

    CHECK(hm_kvm_detach(&err));
    /* hostmem's slots are gone from the VM (the number takes a new address), the VMM's stay. */
    CHECK(vmm_slot(vm, (uint32_t)hostmem_slot, 0x100000000000ULL, fb, 2 << 20) == -1 ||
          vmm_slot(vm, (uint32_t)hostmem_slot, 0x100000000000ULL, fb, 2 << 20) == 0);
    CHECK(vmm_slot(vm, 0, 0xfd000000, fb, 0) == 0);

    memory_region_del_subregion(get_system_memory(), low_mr);
    memory_region_del_subregion(get_system_memory(), high_mr);
    host_memory_backend_set_mapped(low, false);
    host_memory_backend_set_mapped(high, false);
    CHECK(hm_memory_backend_free(low, &err) && hm_memory_backend_free(high, &err));
    expect_no_pending("adopt");
    close(vm);
    close(kvm);
    munmap(fb, 2 << 20);
    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("ok\n");
    return 0;
}
