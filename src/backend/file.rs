//! memory-backend-file: guest RAM in a file (hugetlbfs, tmpfs, a disk file or a directory that
//! gets an unlinked temporary file).

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};

use super::{BackendError, Result};
use crate::hostmap::{host_page_size, HostMapping};
use crate::options::values::size_to_str;

use super::host_limits;
use super::props::OnOffAuto;
use crate::hostmap::{errno, map_aligned, MapSpec, VMALLOC_ALIGN};

/// What QEMU says when the mapping of guest RAM fails.
pub(super) const MAP_FAILED: &str = "unable to map backing store for guest RAM";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProps {
    pub mem_path: Option<String>,
    pub align: u64,
    pub offset: u64,
    pub discard_data: bool,
    pub readonly: bool,
    pub rom: OnOffAuto,
    /// `pmem`: map with MAP_SYNC so writes persist across host crashes on DAX storage.
    pub pmem: bool,
}

impl Default for FileProps {
    fn default() -> Self {
        FileProps {
            mem_path: None,
            align: 0,
            offset: 0,
            discard_data: false,
            readonly: false,
            rom: OnOffAuto::Auto,
            pmem: false,
        }
    }
}

impl FileProps {
    /// Whether guest RAM is read-only: `rom`, where `auto` follows `readonly`.
    pub fn rom_effective(&self) -> bool {
        match self.rom {
            OnOffAuto::Auto => self.readonly,
            OnOffAuto::On => true,
            OnOffAuto::Off => false,
        }
    }

    /// The property combinations QEMU refuses before touching the file.
    pub fn check(&self, share: bool) -> Result<()> {
        if self.mem_path.is_none() {
            return Err(BackendError::MemPathMissing);
        }
        match self.rom {
            OnOffAuto::On if !self.readonly => Err(BackendError::RomOnWithoutReadonly),
            OnOffAuto::Off if self.readonly && share => Err(BackendError::RomOffReadonlyShared),
            _ => Ok(()),
        }
    }
}

/// The page size of the filesystem holding `fd`: its block size on hugetlbfs, else the host's.
pub fn fd_page_size(fd: &OwnedFd) -> usize {
    use std::os::fd::AsRawFd;
    // SAFETY: fstatfs writes one statfs into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; `st` is valid for writes.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } == 0 && st.f_type == libc::HUGETLBFS_MAGIC
    {
        return st.f_bsize as usize;
    }
    host_page_size()
}

/// The file's size as QEMU's `get_file_size` finds it: `lseek` to the end, since `st_size` is 0
/// for special files where seeking works; a negative errno where it does not (a FIFO).
fn fd_size(fd: &OwnedFd) -> i64 {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open fd we own; it moves only the file offset, which mmap ignores.
    let size = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    if size < 0 {
        -(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as i64)
    } else {
        size
    }
}

/// An open backing file and whether we created it (so a failure can remove it again).
struct Opened {
    fd: OwnedFd,
    created: Option<CString>,
}

/// What a mem-path that is neither a regular file nor a directory is, for the error.
fn not_a_regular_file(meta: &std::fs::Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() || t.is_dir() {
        None
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        Some("a special file")
    }
}

fn open_backing(path: &str, region_name: &str, readonly: bool) -> Result<Opened> {
    let cant =
        |e: i32| BackendError::host(format!("can't open backing store {path} for guest RAM"), e);
    let cpath = CString::new(path).map_err(|_| cant(libc::EINVAL))?;
    let meta = std::fs::metadata(path).ok();
    if let Some(kind) = meta.as_ref().and_then(not_a_regular_file) {
        // Checked before open: opening a FIFO read-only would wait for a writer.
        return Err(BackendError::NotARegularFile {
            path: path.to_string(),
            kind,
        });
    }
    if meta.is_some_and(|m| m.is_dir()) {
        // A directory gets a private temporary file, unlinked at once so it vanishes with us.
        let template = format!(
            "{}/qemu_back_mem.{}.XXXXXX",
            path.trim_end_matches('/'),
            region_name.replace('/', "_")
        );
        let mut buf = CString::new(template)
            .map_err(|_| cant(libc::EINVAL))?
            .into_bytes_with_nul();
        // SAFETY: `buf` is a writable NUL-terminated template ending in XXXXXX.
        let fd = unsafe { libc::mkstemp(buf.as_mut_ptr() as *mut libc::c_char) };
        if fd < 0 {
            return Err(cant(errno()));
        }
        // SAFETY: mkstemp left the chosen name in `buf`; removing the file we just made.
        unsafe { libc::unlink(buf.as_ptr() as *const libc::c_char) };
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        return Ok(Opened { fd, created: None });
    }
    let mode = if readonly {
        libc::O_RDONLY
    } else {
        libc::O_RDWR
    };
    // SAFETY: cpath is NUL-terminated.
    let fd = unsafe { libc::open(cpath.as_ptr(), mode | libc::O_CLOEXEC) };
    if fd >= 0 {
        return Ok(Opened {
            // SAFETY: fd is a fresh descriptor we own.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            created: None,
        });
    }
    let e = errno();
    if e != libc::ENOENT || readonly {
        return Err(cant(e));
    }
    // SAFETY: cpath is NUL-terminated; O_EXCL so we only claim a file we really create.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o644 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(cant(errno()));
    }
    Ok(Opened {
        // SAFETY: fd is a fresh descriptor we own.
        fd: unsafe { OwnedFd::from_raw_fd(fd) },
        created: Some(cpath),
    })
}

/// Opens or creates the backing store, checks alignment, offset and size in QEMU's order and
/// wording, sizes an empty file, and maps it. A file this call created is removed on failure;
/// on success its path comes back, for the caller to remove if a later step fails.
pub fn alloc(
    props: &FileProps,
    type_name: &str,
    region_name: &str,
    size: u64,
    share: bool,
    noreserve: bool,
) -> Result<(HostMapping, Option<CString>)> {
    props.check(share)?;
    let path = props.mem_path.as_deref().unwrap_or_default();
    let opened = open_backing(path, region_name, props.readonly)?;
    let result = map_file(
        &opened.fd,
        props,
        type_name,
        region_name,
        size,
        share,
        noreserve,
    );
    match result {
        Ok((p, len, page)) => Ok((
            // SAFETY: map_file just mapped `p..p+len` for us alone.
            unsafe {
                HostMapping::from_raw(p, len, page, Some(opened.fd), share, props.rom_effective())
            }
            .with_file_offset(props.offset),
            opened.created,
        )),
        Err(e) => {
            if let Some(created) = opened.created {
                // SAFETY: removing the file this call created; the path is NUL-terminated.
                unsafe { libc::unlink(created.as_ptr()) };
            }
            Err(e)
        }
    }
}

fn map_file(
    fd: &OwnedFd,
    props: &FileProps,
    type_name: &str,
    region_name: &str,
    size: u64,
    share: bool,
    noreserve: bool,
) -> Result<(*mut u8, usize, usize)> {
    use std::os::fd::AsRawFd;
    let page = fd_page_size(fd);
    let page64 = page as u64;
    if props.align != 0 {
        if !props.align.is_multiple_of(page64) {
            return Err(BackendError::AlignNotPageMultiple {
                align: props.align,
                page: page64,
            });
        }
        if !props.align.is_power_of_two() {
            return Err(BackendError::AlignNotPowerOfTwo(props.align));
        }
    }
    if !props.offset.is_multiple_of(page64) {
        return Err(BackendError::OffsetNotPageMultiple {
            offset: props.offset,
            page: page64,
        });
    }
    // QEMU rounds the size up to the host page before comparing it with the file's page size,
    // so a sub-page size only trips the multiple-of check below.
    let rounded = size.next_multiple_of(host_page_size() as u64);
    if rounded < page64 {
        return Err(BackendError::SizeBelowPage {
            size: rounded,
            page: page64,
        });
    }
    if !size.is_multiple_of(page64) {
        return Err(BackendError::SizeNotPageMultiple {
            ty: type_name.to_string(),
            page: size_to_str(page64),
        });
    }
    let end = props
        .offset
        .checked_add(size)
        .ok_or(BackendError::OffsetTooLarge(props.offset))?;
    let file_size = fd_size(fd);
    // An empty file gets sized; anything else must already hold the range. A read-only empty
    // file cannot be sized, so it is too small too (QEMU would map it and fault later). A size
    // that cannot be known is neither checked nor changed: mmap decides, as in QEMU (FIFOs and
    // devices, where that happens in QEMU, are refused before open_backing opens them).
    if file_size >= 0 && (file_size != 0 || props.readonly) && (file_size as u64) < end {
        return Err(BackendError::FileTooSmall {
            region: region_name.to_string(),
            file_size: file_size as u64,
            size,
            offset: props.offset,
        });
    }
    if file_size == 0 && page > host_page_size() && !noreserve {
        // A new file on hugetlbfs reserves its pages at mmap: read the pool first.
        host_limits::check_pool(
            region_name,
            size,
            page64,
            host_limits::pool_available(page64),
        )?;
    }
    if file_size == 0 {
        // SAFETY: fd is open for writing (not read-only, checked above).
        if unsafe { libc::ftruncate(fd.as_raw_fd(), end as libc::off_t) } != 0 {
            // Not fatal, as in QEMU: a file that cannot be sized is mapped anyway, and the
            // mapping says whether it can be used.
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            eprintln!("ftruncate: {}", crate::error::strerror(errno));
        }
    }
    let len = usize::try_from(size).map_err(|_| BackendError::host(MAP_FAILED, libc::ENOMEM))?;
    let spec = MapSpec {
        len,
        // The user's alignment, but never below 2 MiB (see memfd's mapping).
        align: (props.align as usize).max(page).max(VMALLOC_ALIGN),
        shared: share,
        noreserve,
        readonly: props.rom_effective(),
        file_offset: props.offset,
        sync: props.pmem && share,
    };
    let mapped = map_aligned(&spec, Some(fd)).or_else(|e| {
        if !spec.sync {
            return Err(e);
        }
        // Not DAX storage: QEMU goes on without MAP_SYNC and says so.
        eprintln!(
            "Warning: requesting persistence across crashes for backend file {} failed. Proceeding without persistence, data might become corrupted in case of host crash.",
            props.mem_path.as_deref().unwrap_or_default()
        );
        map_aligned(&MapSpec { sync: false, ..spec }, Some(fd))
    });
    let p = mapped.map_err(|e| BackendError::host(MAP_FAILED, e))?;
    Ok((p, len, page))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(path: &str) -> FileProps {
        FileProps {
            mem_path: Some(path.to_string()),
            ..Default::default()
        }
    }

    fn tmpdir(tag: &str) -> String {
        let d = std::env::temp_dir().join(format!("hostmem-file-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.to_string_lossy().into_owned()
    }

    #[test]
    fn new_file_is_created_and_sized() {
        let d = tmpdir("new");
        let path = format!("{d}/ram");
        let m = alloc(
            &props(&path),
            "memory-backend-file",
            "m",
            1 << 20,
            true,
            false,
        )
        .unwrap()
        .0;
        assert_eq!(m.len(), 1 << 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert!(m.fd().is_some());
        drop(m);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn directory_gets_an_unlinked_temp_file() {
        let d = tmpdir("dir");
        let m = alloc(
            &props(&d),
            "memory-backend-file",
            "/objects/m",
            1 << 20,
            false,
            false,
        )
        .unwrap();
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        drop(m);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn fifo_and_devices_are_not_regular_files() {
        let d = tmpdir("special");
        let fifo = format!("{d}/fifo");
        let c = CString::new(fifo.clone()).unwrap();
        // SAFETY: c is a NUL-terminated path in our scratch directory.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let msg = |path: &str, readonly: bool| {
            let p = FileProps {
                readonly,
                ..props(path)
            };
            alloc(&p, "memory-backend-file", "m", 1 << 20, true, false)
                .unwrap_err()
                .to_string()
        };
        // Read-only, a FIFO would block in open: the refusal comes first.
        assert_eq!(
            msg(&fifo, true),
            format!(
                "can't use {fifo} as backing store for guest RAM: it is a FIFO, not a regular file"
            )
        );
        for dev in ["/dev/null", "/dev/zero"] {
            assert_eq!(
                msg(dev, false),
                format!("can't use {dev} as backing store for guest RAM: it is a character device, not a regular file")
            );
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn refusals_use_qemus_words_and_remove_created_files() {
        let d = tmpdir("bad");
        let path = format!("{d}/ram");
        let t = "memory-backend-file";
        let msg = |p: &FileProps, size| {
            alloc(p, t, "m", size, false, false)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            msg(
                &FileProps {
                    align: 3000,
                    ..props(&path)
                },
                1 << 20
            ),
            "alignment 0xbb8 must be multiples of page size 0x1000"
        );
        assert_eq!(
            msg(
                &FileProps {
                    align: 3 << 20,
                    ..props(&path)
                },
                2 << 20
            ),
            "alignment 0x300000 must be a power of two"
        );
        assert_eq!(
            msg(
                &FileProps {
                    offset: 100,
                    ..props(&path)
                },
                1 << 20
            ),
            "offset 0x64 must be multiples of page size 0x1000"
        );
        assert_eq!(
            msg(&props(&path), 1000),
            "backend 'memory-backend-file' memory size must be multiple of 4 KiB"
        );
        assert_eq!(
            msg(&props(&path), 5000),
            "backend 'memory-backend-file' memory size must be multiple of 4 KiB"
        );
        assert!(
            !std::path::Path::new(&path).exists(),
            "failed alloc left a file behind"
        );
        std::fs::write(&path, [0u8; 4096]).unwrap();
        assert_eq!(
            msg(&props(&path), 1 << 20),
            "m backing store size 0x1000 is too small for 'size' option 0x100000 plus 'offset' option 0x0"
        );
        assert!(
            std::path::Path::new(&path).exists(),
            "a user's file must stay"
        );
        assert_eq!(
            msg(&props("/nonexistent/x"), 1 << 20),
            "can't open backing store /nonexistent/x for guest RAM: No such file or directory"
        );
        assert_eq!(
            msg(
                &FileProps {
                    readonly: true,
                    ..props(&format!("{d}/none"))
                },
                1 << 20
            ),
            format!("can't open backing store {d}/none for guest RAM: No such file or directory")
        );
        assert_eq!(
            msg(
                &FileProps {
                    mem_path: None,
                    ..props("")
                },
                1 << 20
            ),
            "mem-path property not set"
        );
        assert_eq!(
            msg(
                &FileProps {
                    rom: OnOffAuto::On,
                    ..props(&path)
                },
                4096
            ),
            "property 'rom' = 'on' is not supported with 'readonly' = 'off'"
        );
        let e = alloc(
            &FileProps {
                rom: OnOffAuto::Off,
                readonly: true,
                ..props(&path)
            },
            t,
            "m",
            4096,
            true,
            false,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "property 'rom' = 'off' is incompatible with 'readonly' = 'on' and 'share' = 'on'"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn readonly_file_maps_read_only_and_offset_applies() {
        let d = tmpdir("ro");
        let path = format!("{d}/img");
        let mut data = vec![0u8; 8192];
        data[4096] = 0x5a;
        std::fs::write(&path, &data).unwrap();
        let p = FileProps {
            readonly: true,
            offset: 4096,
            ..props(&path)
        };
        let m = alloc(&p, "memory-backend-file", "m", 4096, false, false)
            .unwrap()
            .0;
        assert!(m.is_readonly());
        // SAFETY: reading the first byte of the mapping just made.
        assert_eq!(unsafe { m.as_ptr().read() }, 0x5a);
        drop(m);
        // Preallocating a read-only backend populates it for reading.
        let mut b = crate::backend::Backend::new(
            "memory-backend-file",
            "ro",
            &crate::backend::BackendDefaults::default(),
        )
        .unwrap();
        for (k, v) in [
            ("size", "4K"),
            ("mem-path", path.as_str()),
            ("readonly", "on"),
            ("prealloc", "on"),
        ] {
            b.set(k, v).unwrap();
        }
        b.complete().unwrap();
        let m = b.mapping().unwrap();
        assert_eq!(
            crate::backend::prealloc::resident_pages(m.as_ptr(), 4096),
            1
        );
        drop(b);
        // pmem=on on a non-DAX file still maps (without MAP_SYNC), as in QEMU.
        let p = FileProps {
            pmem: true,
            ..props(&path)
        };
        let m = alloc(&p, "memory-backend-file", "m", 4096, true, false)
            .unwrap()
            .0;
        // SAFETY: writing inside the shared mapping just made.
        unsafe { m.as_ptr().write(1) };
        drop(m);
        std::fs::remove_dir_all(d).unwrap();
    }
}
