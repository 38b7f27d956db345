"""Command-line cases for the small C VMM, shared by record-qemu-expected and run-vmm-case.

A case is c-tests/cases/NAME.case, a list of "key: value" lines ('#' starts a comment line):

  target: x86_64 | s390x | arm   which qemu-system-* is the oracle (vmm has every board)
  args: ...                      the command line, given word for word to QEMU and to vmm
  qemu-args: ...                 extra words for QEMU only: firmware QEMU needs to start a
                                 board whose devices vmm does not model (say why in a comment)
  hmp: COMMAND                   one monitor command, fed on stdin (repeatable, in order); the
                                 transcript shows it as QEMU's readline keeps it (at most 4095
                                 bytes, see readline_kept)
  hmp-bytes: ESCAPED             the same with Python escapes (\x00, \xff) for bytes a text line
                                 cannot hold
  stdin: BYTES                   raw bytes fed on stdin after the hmp commands, written with
                                 Python's escapes (\x00, \xff, \n); for input no command line
                                 can hold: NUL bytes, invalid UTF-8 (repeatable)
  stdin-repeat: N BYTES          BYTES (escapes as above) N times over, then stdin continues
                                 with the next stdin line: very long lines
  setup: SHELL                   run by sh in the scratch directory before the command, for
                                 both sides: a FIFO, a file of given bytes (repeatable)
  expect: qemu | hand-written    where NAME.expected comes from; hand-written ones say why
  ignore-lines: REGEX            lines dropped from both sides before comparing (a part of the
                                 board QEMU has and vmm does not model; say which)
  qemu-differs: REGEX => TEXT    where vmm differs from the oracle on purpose: every match (per
                                 line) in the expected text is replaced by TEXT (\1 for groups)
                                 before comparing, so vmm must print TEXT there (say why)
  compare: ram | full            good cases: compare the RAM view (default) or everything
  requires: kvm                  skipped (meson's status 77) where /dev/kvm is not usable
  requires: amd-host | intel-host
                                 the expected output holds only on a host of that CPU vendor
                                 (under KVM, QEMU gives every CPU model the host's vendor, and
                                 the vendor moves RAM above 4 GiB): skipped on the other
                                 vendor's hosts, also under CI, where the case's twin recorded
                                 on that vendor runs instead
  no-valgrind: WHY               the case cannot run under valgrind (say why): meson registers
                                 no vmm-valgrind test for it, and run-vmm-case --valgrind
                                 refuses it rather than pass it
  xfail: WHY                     known to fail until the named part of hostmem lands: the
                                 driver reports XFAIL with the reason, and fails (XPASS) as
                                 soon as vmm gets it right, so the mark cannot go stale

In args and setup, @TMPDIR@ stands for a fresh scratch directory (and is put back in messages).

NAME.expected holds the exit status, stdout and stderr:

  exit: N
  --- stdout
  ...
  --- stderr
  ...

Stdout is the monitor transcript: the banner, then "(qemu) COMMAND" and its output for each
command, with QEMU's terminal escapes and echo replaced by the plain command, and the HVA column
of `info ramblock` masked. Stderr has QEMU's program name replaced by "vmm".
"""

import codecs
import os
import re
import shlex
import shutil
import subprocess
import tempfile

CASES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "c-tests", "cases")

BANNER = "QEMU 10.0.2 monitor - type 'help' for more information"
PROMPT = "(qemu) "
TIMEOUT = 120


# The host CPU vendors a case can require, as /proc/cpuinfo's vendor_id names them.
HOST_VENDORS = {"amd-host": "AuthenticAMD", "intel-host": "GenuineIntel"}


def host_cpu_vendor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return None


class Case:
    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)[: -len(".case")]
        self.target = "x86_64"
        self.args = []
        self.qemu_args = []
        self.hmp = []
        self.hmp_bytes = []
        self.expect = "qemu"
        self.ignore = []
        self.differs = []
        self.compare = "ram"
        self.requires = []
        self.xfail = None
        self.stdin = b""
        self.setup = []
        self.no_valgrind = None
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                key, sep, value = line.partition(":")
                if not sep:
                    raise ValueError(f"{path}:{lineno}: expected 'key: value'")
                key, value = key.strip(), value.strip()
                if key == "target":
                    self.target = value
                elif key == "args":
                    self.args += shlex.split(value)
                elif key == "qemu-args":
                    self.qemu_args += shlex.split(value)
                elif key in ("hmp", "hmp-bytes"):
                    raw = value.encode()
                    if key == "hmp-bytes":
                        raw = codecs.escape_decode(raw)[0]
                    self.hmp.append(readline_kept(raw).decode(errors="replace"))
                    self.hmp_bytes.append(raw)
                elif key == "stdin":
                    self.stdin += _unescape(value)
                elif key == "stdin-repeat":
                    count, _, text = value.partition(" ")
                    self.stdin += _unescape(text) * int(count)
                elif key == "setup":
                    self.setup.append(value)
                elif key == "expect":
                    self.expect = value.split()[0]
                elif key == "ignore-lines":
                    self.ignore.append(re.compile(value))
                elif key == "qemu-differs":
                    pattern, arrow, text = value.partition(" => ")
                    if not arrow:
                        raise ValueError(f"{path}:{lineno}: expected 'REGEX => TEXT'")
                    self.differs.append((re.compile(pattern, re.M), text))
                elif key == "compare":
                    self.compare = value
                elif key == "xfail":
                    self.xfail = value
                elif key == "no-valgrind":
                    self.no_valgrind = value
                elif key == "requires":
                    for req in value.split():
                        if req != "kvm" and req not in HOST_VENDORS:
                            raise ValueError(f"{path}:{lineno}: unknown requirement '{req}'")
                        self.requires.append(req)
                else:
                    raise ValueError(f"{path}:{lineno}: unknown key '{key}'")
        if self.expect not in ("qemu", "hand-written"):
            raise ValueError(f"{path}: expect must be 'qemu' or 'hand-written'")
        if self.compare not in ("ram", "full"):
            raise ValueError(f"{path}: compare must be 'ram' or 'full'")

    def other_host(self):
        """Why this host cannot show the case's expected output (the other CPU vendor), or None."""
        vendor = host_cpu_vendor()
        for req, want in HOST_VENDORS.items():
            if req in self.requires and vendor != want:
                return f"expected output for {want} hosts; this host is {vendor or 'of unknown vendor'}"
        return None

    def missing_requirements(self):
        missing = []
        if "kvm" in self.requires and not os.access("/dev/kvm", os.R_OK | os.W_OK):
            missing.append("kvm")
        return missing

    @property
    def expected_path(self):
        return self.path[: -len(".case")] + ".expected"

    def stdin_text(self):
        """What the monitor reads: the hmp commands, then the raw stdin bytes."""
        return b"".join(c + b"\n" for c in self.hmp_bytes) + self.stdin

    def typed_lines(self):
        """Every line the monitor reads, as readline keeps it: the hmp commands, then the
        complete lines of the raw stdin bytes."""
        raw_lines = self.stdin.split(b"\n")[:-1]
        return self.hmp + [readline_kept(r).decode(errors="replace") for r in raw_lines]


def readline_kept(raw):
    """What QEMU's readline keeps of a typed line: bytes below 32 dropped, backspace (8, 127)
    and ^U applied, at most 4095 bytes (READLINE_CMD_BUF_SIZE)."""
    out = bytearray()
    for ch in raw:
        if ch in (8, 127):
            del out[-1:]
        elif ch == 21:
            out.clear()
        elif ch >= 32 and len(out) < 4095:
            out.append(ch)
    return bytes(out)


def _unescape(text):
    """Bytes from a value written with Python's string escapes."""
    return text.encode("latin-1").decode("unicode_escape").encode("latin-1")


def all_cases(names=None):
    files = sorted(f for f in os.listdir(CASES_DIR) if f.endswith(".case"))
    cases = [Case(os.path.join(CASES_DIR, f)) for f in files]
    if names:
        wanted = set(names)
        cases = [c for c in cases if c.name in wanted]
        missing = wanted - {c.name for c in cases}
        if missing:
            raise SystemExit(f"no such case: {', '.join(sorted(missing))}")
    return cases


def run(cmd, args, stdin_bytes, setup=()):
    """Runs the setup commands, then cmd + args (with @TMPDIR@ filled in), in a scratch
    directory.

    Returns (exit status, stdout, stderr), with the scratch path put back as @TMPDIR@."""
    tmp = tempfile.mkdtemp(prefix="vmm-case-")
    try:
        for command in setup:
            subprocess.run(["sh", "-ec", command.replace("@TMPDIR@", tmp)], cwd=tmp,
                           check=True, timeout=TIMEOUT)
        argv = cmd + [a.replace("@TMPDIR@", tmp) for a in args]
        p = subprocess.run(argv, input=stdin_bytes, capture_output=True, cwd=tmp,
                           timeout=TIMEOUT)
        out = p.stdout.decode(errors="replace").replace(tmp, "@TMPDIR@")
        err = p.stderr.decode(errors="replace").replace(tmp, "@TMPDIR@")
        return p.returncode, out, err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A row of `info ramblock`: name, page size, offset, used, total, HVA, RO.
_RAMBLOCK_ROW = re.compile(
    r"^(.{24,} .{8}  0x[0-9a-f]{16} 0x[0-9a-f]{16} 0x[0-9a-f]{16}) 0x[0-9a-f]{16}(  ?r[ow])$")
HVA_MASK = "0x" + "x" * 16


def mask_hva(text):
    return "\n".join(_RAMBLOCK_ROW.sub(r"\1 " + HVA_MASK + r"\2", line)
                     for line in text.split("\n"))


def format_expected(status, stdout, stderr):
    return f"exit: {status}\n--- stdout\n{stdout}--- stderr\n{stderr}"


def parse_expected(text):
    m = re.match(r"exit: (-?\d+)\n--- stdout\n(.*)--- stderr\n(.*)\Z", text, re.S)
    if not m:
        raise ValueError("malformed expected file")
    return int(m.group(1)), m.group(2), m.group(3)


def split_transcript(stdout):
    """Splits a transcript into [(command or None for the banner, [lines])]."""
    sections = [(None, [])]
    for line in stdout.split("\n"):
        if line.startswith(PROMPT):
            sections.append((line[len(PROMPT):], []))
        else:
            sections[-1][1].append(line)
    return sections


def _blocks(lines):
    """Blank-line separated blocks of a dump."""
    blocks, cur = [], []
    for line in lines:
        if line == "":
            if cur:
                blocks.append(cur)
            cur = []
        else:
            cur.append(line)
    if cur:
        blocks.append(cur)
    return blocks


_MTREE_LINE = re.compile(
    r"^ *[0-9a-f]{16}-[0-9a-f]{16} \(prio -?\d+, (?:nv-)?(\w+|i/o)\): (alias (\S+) @(\S+) .*|(\S+).*)$")


def _mtree_fields(line):
    """(type, name, alias target or None) of a region line, or None."""
    m = _MTREE_LINE.match(line)
    if not m:
        return None
    if m.group(3):
        return m.group(1), m.group(3), m.group(4)
    return m.group(1), m.group(5), None


def _filter_mtree(lines):
    """The RAM view of `info mtree`: the RAM lines of the system address space, and the
    memory-region sections of RAM regions (main RAM, or the NUMA container of node backends).

    Kept: the address-space block that contains "address-space: memory" and each
    "memory-region: X" block whose tree has a non-alias RAM line, except X = system (QEMU
    prints it again only because the SMM address space aliases it). In a kept block: RAM lines
    (aliases included), aliases of a kept memory-region (they show the container's type, i/o,
    for NUMA), and the first region line of a memory-region block."""
    out_blocks = []
    kept_regions = set()
    candidates = []
    for block in _blocks(lines):
        headers = [l for l in block if not l.startswith(" ")]
        body = [l for l in block if l.startswith(" ")]
        if "address-space: memory" in headers:
            candidates.append(("address-space: memory", None, body))
        elif len(headers) == 1 and headers[0].startswith("memory-region: "):
            region = headers[0][len("memory-region: "):]
            fields = [_mtree_fields(l) for l in body]
            if region != "system" and any(f and f[0] == "ram" and f[2] is None for f in fields):
                kept_regions.add(region)
                candidates.append((headers[0], region, body))
    for header, region, body in candidates:
        kept = [header]
        for i, line in enumerate(body):
            f = _mtree_fields(line)
            if f is None:
                continue
            if f[0] == "ram" or (f[2] is not None and f[2] in kept_regions) or \
                    (region is not None and i == 0):
                kept.append(line)
        out_blocks.append(kept)
    return [l for b in out_blocks for l in b + [""]]


def _filter_mtree_flat(lines):
    """The RAM ranges of the flat view of the "memory" address space."""
    out = []
    for block in _blocks(lines):
        if ' AS "memory", root: system' not in block:
            continue
        out.append('FlatView of AS "memory"')
        out += [l for l in block if (_mtree_fields(l) or ("",))[0] == "ram"]
    return out


def _filter_ramblock(lines):
    """The header and the writable (RAM, not ROM) rows of `info ramblock`."""
    return [l for l in lines if l.endswith("  rw") or l.strip().startswith("Block Name")]


def _filter_memdev(lines):
    """`info memdev` with backends sorted by id (QEMU lists them in hash order)."""
    entries, cur = [], None
    for line in lines:
        if line.startswith("memory backend: "):
            cur = [line]
            entries.append(cur)
        elif cur is not None and line.startswith("  "):
            cur.append(line)
    return [l for e in sorted(entries) for l in e]


_FILTERS = {
    "info mtree": _filter_mtree,
    "info mtree -f": _filter_mtree_flat,
    "info ramblock": _filter_ramblock,
    "info memdev": _filter_memdev,
}


def ram_view(stdout):
    """What the comparison rule of issue 3 looks at in a good case's transcript: the banner,
    each command, and per command the RAM lines defined by the filters above."""
    out = []
    for cmd, lines in split_transcript(stdout):
        out.append(PROMPT + cmd if cmd is not None else "(banner)")
        flt = _FILTERS.get(cmd)
        out += flt(lines) if flt else lines
    return "\n".join(out) + "\n"


def apply_differences(text, differs):
    """The expected text with the case's deliberate differences (qemu-differs) applied."""
    for pattern, replacement in differs:
        text = pattern.sub(replacement, text)
    return text


def drop_ignored(text, patterns):
    if not patterns:
        return text
    return "\n".join(l for l in text.split("\n") if not any(p.search(l) for p in patterns))
