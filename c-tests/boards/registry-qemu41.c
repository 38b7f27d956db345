/*
 * The boards of vmm-qemu41, the VMM that plays QEMU 4.1 in migration tests: the s390 machine
 * types 4.1 and 4.0 with their RAM in separately allocated chunks (s390-ccw-qemu41.c), and
 * "none". vmm.c is the same program as vmm; only this list differs.
 */
#include "boards.h"

bool boards_register_all(Error **errp)
{
    return s390_ccw_qemu41_machine_register(errp) && none_machine_register(errp);
}
