/*
 * The list of boards the small VMM offers, kept apart from the boards themselves: no board
 * file includes another's code, and board-common.c (helpers every board uses) stays a leaf.
 * QEMU keeps no such list (each board registers itself with type_init); a static library has
 * no constructors to rely on, so the VMM calls this once at start.
 */
#include "boards.h"

bool boards_register_all(Error **errp)
{
    return pc_i440fx_machine_register(errp) &&
           pc_q35_machine_register(errp) &&
           s390_ccw_machine_register(errp) &&
           none_machine_register(errp) &&
           sx1_machine_register(errp) &&
           legacy_machine_register(errp) &&
           microbit_machine_register(errp);
}
