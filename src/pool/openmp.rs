//! The host's OpenMP team as the pool's workers, where the process has one.
//!
//! torch runs its operators on a GNU OpenMP (libgomp) team, and by default a team's workers keep
//! spinning for a while after each operator, waiting for the next one. A codec called between
//! two operators (the activation hooks, the optimizer step) then shares the cores with workers
//! that spin instead of sleeping: on a 2-core machine the Rayon pool got about two thirds of
//! them. Running the same work as a parallel region of that team hands it to the spinning
//! workers instead, as an operator of torch's own would.
//!
//! The library is found among the objects already loaded (nothing is loaded here) and only its
//! public entry point `GOMP_parallel` is called. A forked child never uses it: libgomp's team
//! does not survive `fork()`, so [`team`] answers only in the process that found it.

use std::any::Any;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

type Parallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

/// A loaded libgomp's `GOMP_parallel`, and the process that found it.
#[derive(Clone, Copy)]
pub(super) struct Team {
    parallel: Parallel,
    pid: u32,
}

/// What the search found, once it found a team.
static FOUND: OnceLock<Team> = OnceLock::new();
/// The count of loaded objects at the last search that found none: the search runs again only
/// once more objects are loaded (e.g. after `import torch`). A lock, so that a thread that
/// comes while another searches waits for its answer instead of taking "nothing new" for one.
static SEARCHED_AT: Mutex<usize> = Mutex::new(usize::MAX);

thread_local! {
    /// Set on threads running a team region: nested parallel work runs inline there.
    static IN_REGION: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is running a team region.
pub(super) fn in_region() -> bool {
    IN_REGION.with(|f| f.get())
}

/// Opens `path` if it is already loaded (never loads it) and takes its `GOMP_parallel`.
fn open_loaded(path: &CStr) -> Option<Parallel> {
    // SAFETY: dlopen with RTLD_NOLOAD only returns a handle to an object already mapped (or
    // null); dlsym on a valid handle returns the symbol's address or null. GOMP_parallel has had
    // this signature since GCC 4.9 (symbol version GOMP_4.0).
    unsafe {
        let h = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        if h.is_null() {
            return None;
        }
        let f = libc::dlsym(h, c"GOMP_parallel".as_ptr());
        (!f.is_null()).then(|| std::mem::transmute::<*mut c_void, Parallel>(f))
    }
}

/// The paths of the loaded objects named libgomp*.
fn loaded_libgomp() -> Vec<std::ffi::CString> {
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: dl_iterate_phdr passes a valid info and our `data` pointer.
        let (info, paths) = unsafe { (&*info, &mut *(data as *mut Vec<std::ffi::CString>)) };
        if !info.dlpi_name.is_null() {
            // SAFETY: dlpi_name is a NUL-terminated string owned by the loader.
            let name = unsafe { CStr::from_ptr(info.dlpi_name as *const c_char) };
            let file = name.to_bytes().rsplit(|&b| b == b'/').next().unwrap_or(&[]);
            if file.starts_with(b"libgomp") {
                paths.push(name.to_owned());
            }
        }
        0
    }
    let mut paths: Vec<std::ffi::CString> = Vec::new();
    // SAFETY: `visit` only reads what the loader passes and writes through our own pointer.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut paths as *mut _ as *mut c_void) };
    paths
}

/// The count of objects loaded so far (the loader's `dlpi_adds`), read from its first entry.
fn loaded_count() -> usize {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: as in `loaded_libgomp`.
        unsafe { *(data as *mut usize) = (*info).dlpi_adds as usize };
        1
    }
    let mut adds = 0usize;
    // SAFETY: as in `loaded_libgomp`.
    unsafe { libc::dl_iterate_phdr(Some(first), &mut adds as *mut usize as *mut c_void) };
    adds
}

/// The host's OpenMP team, if the process has loaded libgomp (torch does), this is the process
/// that found it, and `SMAQ_RS_THREADS` does not say `rayon`.
pub(super) fn team() -> Option<Team> {
    static ALLOWED: OnceLock<bool> = OnceLock::new();
    let allowed = *ALLOWED.get_or_init(|| {
        std::env::var("SMAQ_RS_THREADS").map_or(true, |v| !v.trim().eq_ignore_ascii_case("rayon"))
    });
    if !allowed {
        return None;
    }
    let here = |t: &Team| (t.pid == std::process::id()).then_some(*t);
    if let Some(t) = FOUND.get() {
        return here(t);
    }
    let mut searched = SEARCHED_AT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = FOUND.get() {
        return here(t);
    }
    let adds = loaded_count();
    if *searched == adds {
        return None;
    }
    *searched = adds;
    let parallel = loaded_libgomp().iter().find_map(|p| open_loaded(p))?;
    here(FOUND.get_or_init(|| Team {
        parallel,
        pid: std::process::id(),
    }))
}

/// One parallel region's shared state.
struct Job<'a> {
    body: &'a (dyn Fn() + Sync),
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

extern "C" fn run_job(data: *mut c_void) {
    // SAFETY: `data` is the `Job` that `Team::run` keeps alive until GOMP_parallel returns.
    let job = unsafe { &*(data as *const Job<'_>) };
    let was = IN_REGION.with(|f| f.replace(true));
    // A panic must not unwind into libgomp: it is caught here and raised again by `run`.
    if let Err(p) = catch_unwind(AssertUnwindSafe(job.body)) {
        job.panic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(p);
    }
    IN_REGION.with(|f| f.set(was));
}

impl Team {
    /// Runs `body` on `threads` threads of the team (the caller is one of them) and returns
    /// when all have finished; a panic in any is raised again here.
    pub(super) fn run(&self, threads: usize, body: &(dyn Fn() + Sync)) {
        let job = Job {
            body,
            panic: Mutex::new(None),
        };
        let threads = c_uint::try_from(threads.max(1)).unwrap_or(c_uint::MAX);
        // SAFETY: `job` outlives the call, which returns only when every thread has left
        // `run_job`; `run_job` never unwinds.
        unsafe { (self.parallel)(run_job, &job as *const Job<'_> as *mut c_void, threads, 0) };
        if let Some(p) = job.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            std::panic::resume_unwind(p);
        }
    }
}

/// Hands out the indices `0..n`, each once, to whoever asks.
pub(super) struct Counter {
    next: AtomicUsize,
    n: usize,
}

impl Counter {
    pub(super) fn new(n: usize) -> Self {
        Counter {
            next: AtomicUsize::new(0),
            n,
        }
    }

    pub(super) fn take(&self) -> Option<usize> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.n).then_some(i)
    }
}

/// Finds libgomp by path for the tests (the test binary links no OpenMP).
#[cfg(test)]
pub(super) fn team_from(path: &CStr) -> Option<Team> {
    // SAFETY: loading the system libgomp runs only its initializers.
    let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return None;
    }
    open_loaded(path).map(|parallel| Team {
        parallel,
        pid: std::process::id(),
    })
}
