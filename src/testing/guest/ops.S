/*
 * The ops program of hostmem's x86-64 test guest (see src/kvm/guest.rs): runs a list of 8-byte
 * writes, reads and waits at guest-physical addresses, then reports on the done port and halts.
 *
 * Entered in 64-bit mode with paging on (identity map built by the host), interrupts off and
 * no stack, at whatever address the host copied the bytes to: nothing here depends on where
 * it runs, so the bytes are a constant.
 *
 * In:   rsi = GPA of the op list: a u64 count, then `count` ops of three u64s each:
 *       kind (0 write, 1 read, 2 wait while equal), gpa (8-byte aligned), value.
 *       A read stores the word it found into the op's value field.
 * Uses: rsi walks the op list, rcx counts the ops left (the host reads it to say which op a
 *       failed run stopped at), rdi is the op's address, rax its kind and then its value, r8d
 *       the spin budget of a wait.
 *
 * The bytes sit in a read-only data section: they are copied into guest RAM, never executed
 * by the host. The labels are hidden so that libhostmem.a exports nothing but its C API.
 */

#if !defined(HM_GUEST_DONE_PORT) || !defined(HM_GUEST_DONE_VALUE) || \
    !defined(HM_GUEST_WAIT_SPIN_LIMIT)
#error "build.rs passes the constants of src/kvm/guest/abi.rs as -D defines"
#endif

    .intel_syntax noprefix
    .code64
    .section .rodata.hm_guest_ops, "a", @progbits

    .globl hm_guest_ops_start
    .hidden hm_guest_ops_start
    .type hm_guest_ops_start, @object
    .globl hm_guest_ops_end
    .hidden hm_guest_ops_end

hm_guest_ops_start:
    mov rcx, qword ptr [rsi]            /* op count */
    add rsi, 8                          /* first op */
.Lloop:
    test rcx, rcx
    jz .Ldone
    mov rax, qword ptr [rsi]            /* kind */
    mov rdi, qword ptr [rsi + 8]        /* gpa */
    test rax, rax
    jz .Lwrite
    cmp rax, 1
    je .Lread

    /* Wait while the word equals the op's value. Only reads, so the wait dirties nothing;
     * the budget runs out after seconds and the program goes on as if released. */
    mov r8d, HM_GUEST_WAIT_SPIN_LIMIT
.Lspin:
    mov rax, qword ptr [rdi]
    cmp rax, qword ptr [rsi + 16]
    jne .Lnext
    pause
    dec r8d
    jnz .Lspin
    jmp .Lnext

.Lwrite:
    mov rax, qword ptr [rsi + 16]
    mov qword ptr [rdi], rax
    jmp .Lnext

.Lread:
    mov rax, qword ptr [rdi]
    mov qword ptr [rsi + 16], rax       /* the host reads the result back from the op */

.Lnext:
    add rsi, 24
    dec rcx
    jmp .Lloop

.Ldone:
    mov edx, HM_GUEST_DONE_PORT
    mov al, HM_GUEST_DONE_VALUE
    out dx, al                          /* PIO exit: every op ran */
.Lhalt:
    hlt                                 /* HLT exit: the host ends the run */
    jmp .Lhalt                          /* halt again if ever woken */
hm_guest_ops_end:

    .size hm_guest_ops_start, hm_guest_ops_end - hm_guest_ops_start

    /* No executable stack for whatever links libhostmem.a. */
    .section .note.GNU-stack, "", @progbits
