"""vmm and real QEMU as processes driven through their HMP monitors (-monitor stdio).

Both print "(qemu) " before reading a command, so a command's output is what comes between
its echo and the next prompt. QEMU's readline echoes the command with terminal escapes as it
is "typed"; vmm echoes it once. Either way the echo ends at the first newline.

The QEMU peers are the ones scripts/install-qemu-peers installs: QEMU 10 on PATH, QEMU 7.2
unpacked under $HOSTMEM_PEERS_DIR (default ~/.cache/hostmem-peers).
"""

import os
import re
import shutil
import subprocess
import threading
import time

PEERS_DIR = os.environ.get("HOSTMEM_PEERS_DIR", os.path.expanduser("~/.cache/hostmem-peers"))
PROMPT = "(qemu) "
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Unavailable(Exception):
    """A peer or a host facility the case needs is missing."""


class PeerError(AssertionError):
    pass


def qemu10(target="x86_64"):
    exe = shutil.which(f"qemu-system-{target}")
    if not exe:
        raise Unavailable(f"qemu-system-{target} not found: run scripts/install-qemu-peers")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "version 10." not in version:
        raise Unavailable(f"{exe} is not QEMU 10: {version.splitlines()[:1]}")
    return [exe]


def qemu72():
    base = os.path.join(PEERS_DIR, "qemu72")
    exe = os.path.join(base, "usr", "bin", "qemu-system-x86_64")
    if not os.access(exe, os.X_OK):
        raise Unavailable(f"{exe} not found: run scripts/install-qemu-peers")
    return [exe, "-L", os.path.join(base, "usr", "share", "qemu")]


class Monitor:
    """One process with its monitor on stdio."""

    def __init__(self, argv, name, netns=None, cwd=None, startup_timeout=60):
        self.name = name
        if netns:
            argv = ["ip", "netns", "exec", netns] + argv
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=cwd)
        self._out = ""
        self._pos = 0
        self._err = []
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, args=(self.proc.stdout, False), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, True), daemon=True).start()
        self.banner = self._until_prompt(startup_timeout)

    def _pump(self, stream, is_err):
        while True:
            chunk = os.read(stream.fileno(), 65536)
            with self._cond:
                if not chunk:
                    if not is_err:
                        self._closed = True
                    self._cond.notify_all()
                    return
                text = chunk.decode(errors="replace")
                if is_err:
                    self._err.append(text)
                else:
                    self._out += text
                self._cond.notify_all()

    @property
    def stderr(self):
        with self._cond:
            return "".join(self._err)

    def _until_prompt(self, timeout):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                at = self._out.find(PROMPT, self._pos)
                if at >= 0:
                    text = self._out[self._pos:at]
                    self._pos = at + len(PROMPT)
                    return _ESCAPE.sub("", text).replace("\r", "")
                if self._closed:
                    raise PeerError(f"{self.name} exited (status {self.proc.wait()}) before its "
                                    f"prompt; stderr:\n{''.join(self._err)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"{self.name}: no prompt within {timeout} s; output so far:\n"
                                    f"{self._out[self._pos:]}\nstderr:\n{''.join(self._err)}")
                self._cond.wait(left)

    def cmd(self, line, timeout=120):
        """Runs one command; returns its output."""
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()
        text = self._until_prompt(timeout)
        _echo, _, output = text.partition("\n")
        return output

    def ok(self, line, timeout=120):
        """Runs a command that must print nothing (QEMU prints only errors for these)."""
        out = self.cmd(line, timeout)
        if out.strip():
            raise PeerError(f"{self.name}: '{line}' printed:\n{out}")

    def info_migrate(self):
        """`info migrate` as (status, {key: value}) of its "key: value" lines."""
        out = self.cmd("info migrate")
        fields = {}
        status = None
        for line in out.splitlines():
            key, sep, value = line.partition(": ")
            if not sep:
                continue
            if key == "Migration status":
                status = value
            fields.setdefault(key, value)
        return status, fields, out

    def wait_migration(self, want=("completed",), timeout=300):
        """Polls `info migrate` until the status is one of `want`; fails on another final one."""
        deadline = time.monotonic() + timeout
        while True:
            status, fields, out = self.info_migrate()
            if status is not None and status.split(" ")[0] in want:
                return fields, out
            if status is not None and status.split(" ")[0] in ("failed", "cancelled",
                                                              "completed"):
                raise PeerError(f"{self.name}: migration {status}\n{out}\nstderr:\n"
                                f"{self.stderr}")
            if time.monotonic() > deadline:
                raise PeerError(f"{self.name}: migration still {status} after {timeout} s\n{out}")
            time.sleep(0.1)

    def socket_addresses(self):
        """What a listening destination lists under `socket address: [...]`."""
        _status, _fields, out = self.info_migrate()
        m = re.search(r"socket address: \[\n(.*?)\]\n", out, re.S)
        return [l.strip() for l in m.group(1).splitlines()] if m else []

    def pmemsave(self, size, path, addr=0):
        # Quoted: unquoted, "/tmp/x" would continue the size expression (a division).
        self.ok(f"pmemsave {addr} {size} \"{path}\"")
        with open(path, "rb") as f:
            return f.read()

    def quit(self, timeout=60):
        """Sends quit; returns the exit status."""
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self.wait_exit(timeout)

    def wait_exit(self, timeout=60):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PeerError(f"{self.name} did not exit within {timeout} s")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def pattern(size, seed):
    """`size` bytes, page by page: a quarter zero, a quarter one repeated byte, half random
    (seeded, so both sides of a comparison can regenerate it); the last quarter of the range
    is all zero, a hole a destination never needs to touch."""
    import random
    rng = random.Random(seed)
    pages = []
    count = size // 4096
    for i in range(count):
        kind = i % 4
        if kind == 0 or i >= count * 3 // 4:
            pages.append(bytes(4096))
        elif kind == 1:
            pages.append(bytes([i & 0xff or 1]) * 4096)
        else:
            pages.append(rng.randbytes(4096))
    return b"".join(pages)
