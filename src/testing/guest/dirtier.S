/*
 * The dirtier program of hostmem's x86-64 test guest (see src/kvm/guest.rs): the workload of
 * the live-migration tests. It keeps every 4 KiB page of a range dirty, in the same pattern as
 * the guest of QEMU's migration test, so the destination can check that no page was lost:
 *
 *   1. byte 0 of every page in [start, end) becomes 0;
 *   2. forever: byte 0 of every page is incremented, in ascending order; after each full pass
 *      the u64 pass counter at HM_GUEST_DIRTIER_PASSES_GPA is incremented (the heartbeat the
 *      host reads), then the stop word at HM_GUEST_DIRTIER_STOP_GPA is read: when the host has
 *      made it non-zero the program reports on the done port and halts.
 *
 * Stopped at any instant after the zeroing, the range therefore holds one value v + 1 up to
 * the page the program was at and v from there on: at most one edge where byte 0 steps down
 * by one (mod 256).
 *
 * Entered in 64-bit mode with paging on (identity map of the range built by the host),
 * interrupts off and no stack, at whatever address the host copied the bytes to.
 *
 * In:   rdi = start, rsi = end, both 4 KiB aligned with start < end (the host checks).
 * Uses: rax walks the pages; rdi and rsi are never changed, so a saved register set is
 *       enough to resume the program on another host.
 *
 * Placement and visibility as in ops.S.
 */

#if !defined(HM_GUEST_DONE_PORT) || !defined(HM_GUEST_DONE_VALUE) || \
    !defined(HM_GUEST_DIRTIER_PASSES_GPA) || !defined(HM_GUEST_DIRTIER_STOP_GPA)
#error "build.rs passes the constants of src/kvm/guest/abi.rs as -D defines"
#endif

    .intel_syntax noprefix
    .code64
    .section .rodata.hm_guest_dirtier, "a", @progbits

    .globl hm_guest_dirtier_start
    .hidden hm_guest_dirtier_start
    .type hm_guest_dirtier_start, @object
    .globl hm_guest_dirtier_end
    .hidden hm_guest_dirtier_end

hm_guest_dirtier_start:
    mov rax, rdi
.Lzero:
    mov byte ptr [rax], 0
    add rax, 4096
    cmp rax, rsi
    jb .Lzero

.Lpass:
    mov rax, rdi
.Linc:
    inc byte ptr [rax]                  /* QEMU's guest does the same `incb` */
    add rax, 4096
    cmp rax, rsi
    jb .Linc
    inc qword ptr [HM_GUEST_DIRTIER_PASSES_GPA]
    cmp qword ptr [HM_GUEST_DIRTIER_STOP_GPA], 0
    je .Lpass

    mov edx, HM_GUEST_DONE_PORT
    mov al, HM_GUEST_DONE_VALUE
    out dx, al                          /* PIO exit: stopped at the end of a pass */
.Lhalt:
    hlt
    jmp .Lhalt
hm_guest_dirtier_end:

    .size hm_guest_dirtier_start, hm_guest_dirtier_end - hm_guest_dirtier_start

    .section .note.GNU-stack, "", @progbits
