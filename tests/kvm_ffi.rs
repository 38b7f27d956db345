//! The KVM C API (src/ffi/kvm.rs) as a C caller uses it, on the process-wide current machine:
//! alone in its own test binary so no other test changes the current machine under it.

use std::ptr::null_mut;

use hostmem::error::Error;
use hostmem::ffi::kvm::*;
use hostmem::ffi::testing::*;
use hostmem::machine::Machine;
use hostmem::registry;

/// Runs `f` on a fresh current machine, restoring nothing: each test makes its own.
fn in_new_machine(f: impl FnOnce()) {
    let id = registry::insert(Machine::new());
    registry::set_current(id).unwrap();
    f();
    registry::remove(id).unwrap();
}

fn kvm_present() -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("KVM is required under CI=true: {e}")
        }
        Err(_) => false,
    }
}

fn take_message(err: *mut Error) -> String {
    assert!(!err.is_null());
    // SAFETY: a live Error from hostmem; the message is copied before the error is freed once.
    unsafe {
        let m = std::ffi::CStr::from_ptr(hostmem::ffi::error::error_get_pretty(err))
            .to_str()
            .unwrap()
            .to_string();
        hostmem::ffi::error::error_free(err);
        m
    }
}

// These tests share the process-wide "current machine": one test does it all in sequence.
#[test]
fn the_c_api_attaches_lists_slots_checks_the_guest_and_tracks_dirty_pages() {
    if !kvm_present() {
        return;
    }
    in_new_machine(|| {
        // Before attaching: well-defined answers, no crash.
        assert!(!hm_kvm_enabled());
        assert_eq!(hm_kvm_vm_fd(), -1);
        // SAFETY: NULL with max 0 is allowed.
        assert_eq!(unsafe { hm_kvm_get_slots(null_mut(), 0) }, 0);
        let mut err = null_mut();
        assert!(!hm_kvm_dirty_log_start(&mut err));
        assert_eq!(take_message(err), "KVM is not attached to this machine");
        let text = hm_kvm_info_memslots();
        // SAFETY: a NUL-terminated string from c_string.
        let s = unsafe { std::ffi::CStr::from_ptr(text) }
            .to_str()
            .unwrap()
            .to_string();
        // SAFETY: returned by hostmem, released once.
        unsafe { hostmem::ffi::hm_free(text.cast()) };
        assert_eq!(s, "KVM is not attached to this machine\n");

        registry::with_current(|_, m| {
            let mem = m.memory_mut();
            let ram = mem.new_ram_anonymous("pc.ram", 3 << 30)?;
            let sys = mem.system_memory();
            mem.add_subregion(sys, 0, ram, None)
        })
        .unwrap();
        let mut err = null_mut();
        assert!(!hm_kvm_attach(4097, &mut err));
        assert!(take_message(err).contains("must be a multiple of the host page size"));
        assert!(hm_kvm_attach(1 << 30, null_mut()));
        assert!(hm_kvm_enabled());
        assert!(hm_kvm_vm_fd() >= 0);

        let mut slots = [HmKvmSlot::default(); 2];
        // SAFETY: room for 2.
        let n = unsafe { hm_kvm_get_slots(slots.as_mut_ptr(), 2) };
        assert_eq!(n, 3);
        assert_eq!(
            (slots[1].slot, slots[1].gpa, slots[1].size),
            (1, 1 << 30, 1 << 30)
        );
        assert_eq!(slots[1].ramblock_offset, 1 << 30);

        let mut check = HmGuestCheck::default();
        // SAFETY: valid out pointer.
        assert!(unsafe { hm_kvm_guest_check(&mut check, null_mut()) });
        assert_eq!(
            (check.slots, check.signatures, check.bytes_verified),
            (3, 6, 48)
        );

        assert!(hm_kvm_dirty_log_start(null_mut()));
        assert!(hm_kvm_dirty_log_sync(null_mut()));
        let gpas = [0x40_0000u64, (2 << 30) + 0x8000];
        let vals = [5u64, 6];
        // SAFETY: two readable values each.
        assert!(unsafe { hm_kvm_guest_write(gpas.as_ptr(), vals.as_ptr(), 2, null_mut()) });
        assert!(hm_kvm_dirty_log_sync(null_mut()));
        let mut dirty = [0u64; 4];
        // SAFETY: room for 4.
        let n = unsafe { hm_kvm_dirty_pages(dirty.as_mut_ptr(), 4) };
        assert_eq!(&dirty[..n], &gpas);
        // Reads store their results in the payload's op list: that page is the only one
        // the guest dirties.
        let mut back = [0u64; 2];
        // SAFETY: two readable gpas, two writable values.
        assert!(unsafe { hm_kvm_guest_read(gpas.as_ptr(), back.as_mut_ptr(), 2, null_mut()) });
        assert_eq!(back, vals);
        assert!(hm_kvm_dirty_log_sync(null_mut()));
        // SAFETY: room for 4.
        let n = unsafe { hm_kvm_dirty_pages(dirty.as_mut_ptr(), 4) };
        assert_eq!(n, 1);
        assert!(dirty[0] < 0xa_0000, "0x{:x}", dirty[0]);
        assert!(hm_kvm_dirty_log_stop(null_mut()));

        let text = hm_kvm_info_memslots();
        // SAFETY: a NUL-terminated string from c_string.
        let s = unsafe { std::ffi::CStr::from_ptr(text) }
            .to_str()
            .unwrap()
            .to_string();
        // SAFETY: returned by hostmem, released once.
        unsafe { hostmem::ffi::hm_free(text.cast()) };
        assert!(s.starts_with("KVM memslots: 3 used of "), "{s}");
        assert_eq!(s.lines().count(), 5);

        let mut err = null_mut();
        // SAFETY: NULL with n > 0 is the error under test.
        assert!(!unsafe { hm_kvm_guest_write(std::ptr::null(), vals.as_ptr(), 2, &mut err) });
        assert_eq!(take_message(err), "Parameter 'gpas' is missing");
        let mut err = null_mut();
        // SAFETY: NULL out is the error under test.
        assert!(!unsafe { hm_kvm_guest_check(null_mut(), &mut err) });
        assert_eq!(take_message(err), "Parameter 'out' is missing");

        assert!(hm_kvm_detach(null_mut()));
        assert!(!hm_kvm_enabled());
    });
}
