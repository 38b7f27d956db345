#!/usr/bin/env python3
"""Tests of the case machinery itself: the filters must keep what issue 3 compares and drop only
what vmm does not model, and the recorder must turn QEMU's terminal echo into plain commands."""

import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import vmm_cases as vc  # noqa: E402


def load_script(name):
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), os.path.join(HERE, name))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


record = load_script("record-qemu-expected")

HEADER = ("              Block Name    PSize              Offset               Used"
          "              Total                HVA  RO")
PC_RAM_ROW = ("                  pc.ram    4 KiB  0x0000000000000000 0x0000000100000000"
              " 0x0000000100000000 0x00007f2343e00000  rw")
BIOS_ROW = ("                 pc.bios    4 KiB  0x0000000100000000 0x0000000000040000"
            " 0x0000000000040000 0x00007f2490e00000  ro")

MTREE = """(qemu) info mtree
address-space: cpu-memory-0
address-space: memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-00000000bfffffff (prio 0, ram): alias ram-below-4g @pc.ram 0000000000000000-00000000bfffffff
    0000000000000000-ffffffffffffffff (prio -1, i/o): pci
      00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
    0000000100000000-000000013fffffff (prio 0, ram): alias ram-above-4g @pc.ram 00000000c0000000-00000000ffffffff

memory-region: smram
  0000000000000000-00000000ffffffff (prio 0, i/o): smram
    00000000000a0000-00000000000bffff (prio 0, ram): alias smram-low @pc.ram 00000000000a0000-00000000000bffff

memory-region: system
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-00000000bfffffff (prio 0, ram): alias ram-below-4g @pc.ram 0000000000000000-00000000bfffffff

memory-region: pc.ram
  0000000000000000-00000000ffffffff (prio 0, ram): pc.ram

"""


class Filters(unittest.TestCase):
    def test_hva_is_masked_and_nothing_else(self):
        masked = vc.mask_hva(PC_RAM_ROW)
        self.assertNotIn("0x00007f2343e00000", masked)
        self.assertEqual(masked.replace(vc.HVA_MASK, "0x00007f2343e00000"), PC_RAM_ROW)

    def test_ramblock_keeps_ram_rows_only(self):
        out = vc.ram_view(f"banner\n(qemu) info ramblock\n{HEADER}\n{PC_RAM_ROW}\n{BIOS_ROW}\n")
        self.assertIn(PC_RAM_ROW, out)
        self.assertIn(HEADER, out)
        self.assertNotIn("pc.bios", out)

    def test_ramblock_difference_is_seen(self):
        other = PC_RAM_ROW.replace("0x0000000100000000 0x0000000100000000",
                                   "0x00000000c0000000 0x00000000c0000000")
        self.assertNotEqual(vc.ram_view(f"(qemu) info ramblock\n{PC_RAM_ROW}\n"),
                            vc.ram_view(f"(qemu) info ramblock\n{other}\n"))

    def test_mtree_keeps_ram_aliases_and_main_ram(self):
        out = vc.ram_view(MTREE)
        self.assertIn("alias ram-below-4g @pc.ram", out)
        self.assertIn("alias ram-above-4g @pc.ram", out)
        self.assertIn("memory-region: pc.ram\n  0000000000000000-00000000ffffffff (prio 0, ram): pc.ram", out)
        # Not modelled by vmm: SMM's view, ROMs, the system region printed a second time.
        self.assertNotIn("smram", out)
        self.assertNotIn("pc.rom", out)
        self.assertNotIn("memory-region: system", out)

    def test_mtree_alias_change_is_seen(self):
        moved = MTREE.replace("0000000100000000-000000013fffffff (prio 0, ram): alias ram-above-4g",
                              "0000000100000000-000000013fffffff (prio 1, ram): alias ram-above-4g")
        self.assertNotEqual(vc.ram_view(MTREE), vc.ram_view(moved))

    def test_numa_container_aliases_are_kept_though_io(self):
        numa = """(qemu) info mtree
address-space: memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-0000000003ffffff (prio 0, i/o): alias ram-below-4g @pc.ram 0000000000000000-0000000003ffffff

memory-region: pc.ram
  0000000000000000-0000000007ffffff (prio 0, i/o): pc.ram
    0000000000000000-0000000003ffffff (prio 0, ram): m0
"""
        out = vc.ram_view(numa)
        self.assertIn("alias ram-below-4g @pc.ram", out)
        self.assertIn("(prio 0, i/o): pc.ram", out)
        self.assertIn("(prio 0, ram): m0", out)

    def test_flat_view_keeps_ram_ranges_of_the_memory_space(self):
        flat = """(qemu) info mtree -f
FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-000000000000ffff (prio 0, i/o): io

FlatView #1
 AS "memory", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): pc.ram
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  0000000000100000-0000000003ffffff (prio 0, ram): pc.ram @0000000000100000

"""
        out = vc.ram_view(flat)
        self.assertIn("pc.ram @0000000000100000", out)
        self.assertNotIn("pc.rom", out)
        self.assertNotIn("): io", out)

    def test_memdev_order_does_not_matter(self):
        a = "memory backend: m0\n  size:  1\nmemory backend: m1\n  size:  2\n"
        b = "memory backend: m1\n  size:  2\nmemory backend: m0\n  size:  1\n"
        self.assertEqual(vc.ram_view("(qemu) info memdev\n" + a),
                         vc.ram_view("(qemu) info memdev\n" + b))
        self.assertNotEqual(vc.ram_view("(qemu) info memdev\n" + a),
                            vc.ram_view("(qemu) info memdev\n" + a.replace("1\n", "3\n")))

    def test_expected_file_round_trip(self):
        text = vc.format_expected(1, "", "vmm: boom\n")
        self.assertEqual(vc.parse_expected(text), (1, "", "vmm: boom\n"))


class Recorder(unittest.TestCase):
    def test_echo_and_escapes_become_the_command(self):
        raw = ("QEMU 10.0.2 monitor - type 'help' for more information\r\n"
               "(qemu) i\x1b[K\x1b[Din\x1b[K\x1b[D\x1b[Dinfo ramblock\x1b[K\r\n"
               f"{HEADER}\r\n{PC_RAM_ROW}\r\n"
               "(qemu) q\x1b[K\x1b[Dqu\x1b[Kquit\x1b[K\r\n")
        out = record.clean_stdout(raw, ["info ramblock", "quit"])
        self.assertEqual(out, "QEMU 10.0.2 monitor - type 'help' for more information\n"
                              f"(qemu) info ramblock\n{HEADER}\n{vc.mask_hva(PC_RAM_ROW)}\n"
                              "(qemu) quit\n")

    def test_program_name_becomes_vmm(self):
        self.assertEqual(record.clean_stderr("qemu-system-x86_64: -m foo: bad\nhint\n"),
                         "vmm: -m foo: bad\nhint\n")


class Differences(unittest.TestCase):
    def case(self, text):
        fd, path = tempfile.mkstemp(suffix=".case")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            return vc.Case(path)
        finally:
            os.unlink(path)

    def test_qemu_differs_rewrites_the_expected_line_only(self):
        case = self.case("args: -M help\n"
                         r"qemu-differs: ^(s390-ccw-virtio-10\.0 .*) \(default\)$ => \1" "\n")
        expected = "none                 empty machine\n" \
                   "s390-ccw-virtio-10.0 Virtual s390x machine (version 10.0) (default)\n"
        self.assertEqual(vc.apply_differences(expected, case.differs),
                         "none                 empty machine\n"
                         "s390-ccw-virtio-10.0 Virtual s390x machine (version 10.0)\n")

    def test_stdin_bytes_follow_the_commands(self):
        case = self.case("hmp: info status\n"
                         r"stdin: a\x00b\xff\n" "\n"
                         "stdin-repeat: 3 xy\n")
        self.assertEqual(case.stdin_text(), b"info status\na\x00b\xff\nxyxyxy")

    def test_setup_runs_in_the_scratch_directory_before_the_command(self):
        case = self.case("setup: mkfifo @TMPDIR@/fifo\nsetup: printf 'QEVM' > s\n")
        status, out, _ = vc.run(["sh", "-c", "test -p fifo && cat s && echo @TMPDIR@"], [],
                                b"", case.setup)
        self.assertEqual((status, out), (0, "QEVM@TMPDIR@\n"))

    def test_a_case_of_the_other_vendor_is_for_another_host(self):
        here = vc.host_cpu_vendor()
        for req, vendor in vc.HOST_VENDORS.items():
            reason = self.case(f"requires: kvm {req}\n").other_host()
            if vendor == here:
                self.assertIsNone(reason)
            else:
                self.assertIn(vendor, reason)
        self.assertIsNone(self.case("requires: kvm\n").other_host())

    def test_an_unknown_requirement_is_refused(self):
        with self.assertRaises(ValueError):
            self.case("requires: amd\n")

    def test_qemu_differs_needs_an_arrow(self):
        with self.assertRaises(ValueError):
            self.case("qemu-differs: (default)\n")


class Cases(unittest.TestCase):
    def test_every_case_parses_and_has_an_expected_file(self):
        for case in vc.all_cases():
            self.assertTrue(os.path.exists(case.expected_path), case.name)
            status, _, err = vc.parse_expected(open(case.expected_path).read())
            if status != 0:
                # What vmm must print: QEMU's words, after the case's stated differences.
                err = vc.apply_differences(err, case.differs)
                self.assertTrue(err.startswith("vmm: "), case.name)

    def test_every_vendor_bound_case_has_a_twin_for_the_other_vendor(self):
        # A case that only one vendor's host can run must not leave the other's behaviour
        # untested: its twin has the same name with the vendor swapped.
        names = {c.name for c in vc.all_cases()}
        for case in vc.all_cases():
            if "amd-host" in case.requires:
                self.assertIn(case.name.replace("amd-host", "intel-host"), names, case.name)
            if "intel-host" in case.requires:
                self.assertIn(case.name.replace("intel-host", "amd-host"), names, case.name)

    def test_xfail_marks_name_what_is_missing(self):
        for case in vc.all_cases():
            if case.xfail is not None:
                self.assertGreater(len(case.xfail), 20, case.name)

    def test_the_corpus_table_in_reliability_md_is_current(self):
        table = load_script("corpus-table").table()
        doc = open(os.path.join(HERE, "..", "docs", "RELIABILITY.md")).read()
        self.assertIn(table, doc, "docs/RELIABILITY.md is stale: scripts/corpus-table --write")
        self.assertGreaterEqual(table.count("\n| `"), 100)

    def test_hand_written_cases_say_why(self):
        for case in vc.all_cases():
            if case.expect == "hand-written":
                self.assertIn("HAND-WRITTEN", open(case.path).read(), case.name)


if __name__ == "__main__":
    unittest.main()
