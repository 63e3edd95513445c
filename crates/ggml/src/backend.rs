//! Devices, backends, buffers and the backend scheduler.
use crate::context::{Context, Graph, Tensor};
use crate::{Error, Result, Type, sys};
use std::ffi::CStr;
use std::ptr::NonNull;
use std::sync::Arc;

/// What kind of device a backend runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
    IntegratedGpu,
    Accelerator,
}

/// A compute device from ggml's registry.
#[derive(Clone, Copy)]
pub struct Device(sys::ggml_backend_dev_t);

// SAFETY: device handles are static registry entries.
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

// Devices are entries of ggml's registry, which lives as long as the process: two
// handles are the same device when they point at the same entry.
impl PartialEq for Device {
    fn eq(&self, other: &Device) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Device {}

impl std::hash::Hash for Device {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.0 as usize).hash(state);
    }
}

impl Default for Device {
    /// The CPU.
    fn default() -> Device {
        Device::cpu()
    }
}

impl Device {
    /// The CPU, which every build of ggml-sys registers (its CPU backend is built in).
    pub fn cpu() -> Device {
        // SAFETY: registry query.
        let dev = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
        assert!(!dev.is_null(), "ggml was built without its CPU backend");
        Device(dev)
    }

    /// Whether this is the CPU (where lanes, repacked weights and our own kernels run).
    pub fn is_cpu(&self) -> bool {
        self.kind() == DeviceKind::Cpu
    }

    /// All devices ggml knows in this build (CPU, and CUDA/Vulkan when compiled in).
    pub fn all() -> Vec<Device> {
        // SAFETY: registry queries.
        let n = unsafe { sys::ggml_backend_dev_count() };
        (0..n)
            .map(|i| Device(unsafe { sys::ggml_backend_dev_get(i) }))
            .collect()
    }

    /// ggml's device name, e.g. `CPU`, `CUDA0`, `Vulkan0`.
    pub fn name(&self) -> String {
        // SAFETY: static string from the registry.
        unsafe { CStr::from_ptr(sys::ggml_backend_dev_name(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    pub fn description(&self) -> String {
        // SAFETY: static string from the registry.
        unsafe { CStr::from_ptr(sys::ggml_backend_dev_description(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    pub fn kind(&self) -> DeviceKind {
        // SAFETY: registry query.
        match unsafe { sys::ggml_backend_dev_type(self.0) } {
            sys::GGML_BACKEND_DEVICE_TYPE_CPU => DeviceKind::Cpu,
            sys::GGML_BACKEND_DEVICE_TYPE_IGPU => DeviceKind::IntegratedGpu,
            sys::GGML_BACKEND_DEVICE_TYPE_GPU => DeviceKind::Gpu,
            _ => DeviceKind::Accelerator,
        }
    }

    /// Our spelling of the device: `cpu`, `cuda:0`, `vulkan:1`, ...
    pub fn spec(&self) -> String {
        let name = self.name();
        let split = name
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(name.len());
        let (family, index) = name.split_at(split);
        if index.is_empty() {
            family.to_ascii_lowercase()
        } else {
            format!("{}:{index}", family.to_ascii_lowercase())
        }
    }

    /// Finds a device by spec: `cpu`, `cuda:N`, `vulkan:N`, a ggml device name
    /// (`CUDA0`), or `gpu` for the first GPU.
    pub fn find(spec: &str) -> Result<Device> {
        let all = Device::all();
        let want = spec.trim().to_ascii_lowercase();
        let found = if want == "gpu" {
            all.iter()
                .find(|d| matches!(d.kind(), DeviceKind::Gpu | DeviceKind::IntegratedGpu))
        } else {
            let complete =
                want.contains(':') || want.ends_with(|c: char| c.is_ascii_digit()) || want == "cpu";
            let want = if complete { want } else { format!("{want}:0") };
            all.iter()
                .find(|d| d.spec() == want || d.name().to_ascii_lowercase() == want)
        };
        found.copied().ok_or_else(|| Error::NoSuchDevice {
            spec: spec.to_string(),
            available: all.iter().map(|d| d.spec()).collect::<Vec<_>>().join(", "),
        })
    }

    /// The device's extra buffer types, beside its default one: on the CPU, `CPU_REPACK`
    /// stores weights in interleaved layouts that its matrix kernels read faster.
    pub fn extra_buffer_types(&self) -> Vec<BufferType> {
        // SAFETY: looks up the optional `ggml_backend_dev_get_extra_bufts` entry point of the
        // device's registry (signature fixed by ggml-backend.h); it returns a static,
        // null-terminated array.
        unsafe {
            let reg = sys::ggml_backend_dev_backend_reg(self.0);
            let f = sys::ggml_backend_reg_get_proc_address(
                reg,
                c"ggml_backend_dev_get_extra_bufts".as_ptr(),
            );
            if f.is_null() {
                return Vec::new();
            }
            let f: sys::ggml_backend_dev_get_extra_bufts_t = std::mem::transmute(f);
            let Some(f) = f else { return Vec::new() };
            let mut p = f(self.0);
            let mut out = Vec::new();
            while !p.is_null() && !(*p).is_null() {
                out.push(BufferType(*p));
                p = p.add(1);
            }
            out
        }
    }
}

/// A kind of buffer: a backend's default one, or a device's extra one (see
/// [`Device::extra_buffer_types`]).
#[derive(Clone, Copy)]
pub struct BufferType(sys::ggml_backend_buffer_type_t);

// SAFETY: buffer types are static registry entries.
unsafe impl Send for BufferType {}
unsafe impl Sync for BufferType {}

impl BufferType {
    pub fn name(&self) -> String {
        // SAFETY: static string of a registered buffer type.
        unsafe { CStr::from_ptr(sys::ggml_backend_buft_name(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    /// Whether `device` runs a matrix multiplication whose weight, of type `ty` and shape
    /// `ne`, is stored in this buffer type (an extra type may take only some types and
    /// shapes, e.g. rows in multiples of 8). Asked the way llama.cpp asks: with a
    /// metadata-only `mul_mat` whose weight sits in an empty buffer of this type.
    pub fn supports_weight(&self, device: Device, ty: Type, ne: &[usize]) -> bool {
        let probe = || -> Result<bool> {
            let ctx = Context::new(3, 0)?;
            let w = ctx.new_tensor(ty, ne)?;
            let x = ctx.new_tensor(Type::F32, &[ne[0], 1])?;
            let op = ctx.mul_mat(w, x)?;
            // SAFETY: a zero-size buffer only carries its type; the weight points at it during
            // the query and is detached before the buffer is freed.
            unsafe {
                let buf = sys::ggml_backend_buft_alloc_buffer(self.0, 0);
                if buf.is_null() {
                    return Ok(false);
                }
                (*w.as_ptr()).buffer = buf;
                let ok = sys::ggml_backend_dev_supports_op(device.0, op.as_ptr());
                (*w.as_ptr()).buffer = std::ptr::null_mut();
                sys::ggml_backend_buffer_free(buf);
                Ok(ok)
            }
        };
        ne.len() == 2 && probe().unwrap_or(false)
    }

    /// Allocates one buffer of this type for every tensor of `ctx`.
    pub fn alloc_tensors(&self, ctx: &Context) -> Result<Buffer> {
        let bytes: usize = ctx.tensors().map(|t| t.nbytes()).sum();
        // SAFETY: valid context and buffer type; null return handled.
        let ptr = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.as_ptr(), self.0) };
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::BufferAlloc {
            backend: self.name(),
            bytes,
        })?;
        Ok(Buffer { ptr, _host: None })
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.spec(), self.description())
    }
}

/// An initialised backend on one device.
pub struct Backend {
    ptr: NonNull<sys::ggml_backend>,
    device: Device,
}

// SAFETY: ggml backends may be used from any thread, one at a time (`!Sync`).
unsafe impl Send for Backend {}

impl Backend {
    /// Initialises the device named by `spec` (see [`Device::find`]).
    pub fn new(spec: &str) -> Result<Backend> {
        Backend::on(Device::find(spec)?)
    }

    pub fn cpu() -> Result<Backend> {
        Backend::new("cpu")
    }

    pub fn on(device: Device) -> Result<Backend> {
        // SAFETY: valid device, null params.
        let ptr = unsafe { sys::ggml_backend_dev_init(device.0, std::ptr::null()) };
        Ok(Backend {
            ptr: NonNull::new(ptr).ok_or_else(|| Error::BackendInit(device.spec()))?,
            device,
        })
    }

    pub(crate) fn as_ptr(&self) -> sys::ggml_backend_t {
        self.ptr.as_ptr()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn is_cpu(&self) -> bool {
        self.device.is_cpu()
    }

    /// Sets the number of worker threads where the backend has them (the CPU one).
    pub fn set_n_threads(&self, n: usize) {
        // SAFETY: looks up the optional `ggml_backend_set_n_threads` entry point of the
        // device's registry; its signature is fixed by ggml-backend.h.
        unsafe {
            let reg = sys::ggml_backend_dev_backend_reg(self.device.0);
            let name = c"ggml_backend_set_n_threads";
            let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
            if !f.is_null() {
                let f: sys::ggml_backend_set_n_threads_t = std::mem::transmute(f);
                if let Some(f) = f {
                    f(self.as_ptr(), n.max(1) as i32);
                }
            }
        }
    }

    /// The backend's default buffer type (device memory for a GPU).
    pub fn buffer_type(&self) -> BufferType {
        // SAFETY: valid backend.
        BufferType(unsafe { sys::ggml_backend_get_default_buffer_type(self.as_ptr()) })
    }

    /// Allocates one buffer on this backend for every tensor of `ctx`.
    pub fn alloc_tensors(&self, ctx: &Context) -> Result<Buffer> {
        self.buffer_type().alloc_tensors(ctx)
    }

    /// Computes a graph whose tensors are all allocated, on this backend alone.
    pub fn compute(&self, graph: &Graph<'_>) -> Result<()> {
        // SAFETY: valid backend and graph.
        let status = unsafe { sys::ggml_backend_graph_compute(self.as_ptr(), graph.as_ptr()) };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(Error::Compute(status));
        }
        Ok(())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: owned backend.
        unsafe { sys::ggml_backend_free(self.as_ptr()) }
    }
}

/// Host memory that a CPU buffer may point into (a memory-mapped file, a Vec).
pub trait HostMemory: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl HostMemory for memmap2::Mmap {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl HostMemory for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A backend buffer holding tensor data.
pub struct Buffer {
    ptr: NonNull<sys::ggml_backend_buffer>,
    /// Keeps host memory alive when the buffer points into it.
    _host: Option<Arc<dyn HostMemory>>,
}

// SAFETY: buffers are plain memory regions managed by ggml.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    /// A CPU buffer over existing host memory, without copying. Tensors are then
    /// placed into it with [`Buffer::place`].
    pub fn from_host(memory: Arc<dyn HostMemory>) -> Result<Buffer> {
        let bytes = memory.bytes();
        // SAFETY: the memory stays alive as long as the buffer (kept in `_host`); ggml
        // only reads weights placed there (they are never graph outputs).
        let ptr =
            unsafe { sys::ggml_backend_cpu_buffer_from_ptr(bytes.as_ptr() as *mut _, bytes.len()) };
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::BufferAlloc {
            backend: "cpu".into(),
            bytes: bytes.len(),
        })?;
        Ok(Buffer {
            ptr,
            _host: Some(memory),
        })
    }

    /// Points `tensor` at `offset` bytes into a host buffer.
    pub fn place(&self, tensor: Tensor<'_>, offset: usize) -> Result<()> {
        let host = self
            ._host
            .as_ref()
            .ok_or_else(|| crate::error::shape("place", "buffer is not over host memory"))?;
        let len = host.bytes().len();
        let end = offset.checked_add(tensor.nbytes());
        if tensor.is_read_only() {
            return Err(Error::ReadOnly(tensor.name()));
        }
        if end.is_none_or(|e| e > len) || tensor.is_allocated() {
            return Err(Error::DataSize {
                name: tensor.name(),
                got: len.saturating_sub(offset),
                expected: tensor.nbytes(),
            });
        }
        // SAFETY: the range lies inside the buffer's memory, checked above.
        let status = unsafe {
            let base = sys::ggml_backend_buffer_get_base(self.ptr.as_ptr()) as *mut u8;
            sys::ggml_backend_tensor_alloc(
                self.ptr.as_ptr(),
                tensor.as_ptr(),
                base.add(offset).cast(),
            )
        };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(Error::Compute(status));
        }
        Ok(())
    }

    pub fn size(&self) -> usize {
        // SAFETY: valid buffer.
        unsafe { sys::ggml_backend_buffer_get_size(self.ptr.as_ptr()) }
    }

    /// Marks the buffer as holding weights (the scheduler then prefers running the
    /// operations that use them on this buffer's backend).
    pub fn set_weights_usage(&self) {
        // SAFETY: valid buffer.
        unsafe {
            sys::ggml_backend_buffer_set_usage(
                self.ptr.as_ptr(),
                sys::GGML_BACKEND_BUFFER_USAGE_WEIGHTS,
            )
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: owned buffer.
        unsafe { sys::ggml_backend_buffer_free(self.ptr.as_ptr()) }
    }
}

/// The CPU backend's worker threads, kept between graphs and set not to poll for
/// work: between two graphs they sleep instead of spinning, so a model that waits for
/// its next frame costs the other programs on the machine nothing. (Without a pool of
/// its own, ggml starts and joins threads for every graph, which poll while they live.)
struct ThreadPool(NonNull<sys::ggml_threadpool>);

impl ThreadPool {
    fn new(threads: usize) -> Result<ThreadPool> {
        // SAFETY: plain parameter initialisation.
        let mut params = unsafe { sys::ggml_threadpool_params_default(threads.max(1) as i32) };
        params.poll = 0;
        // SAFETY: valid parameters; a null return is handled.
        NonNull::new(unsafe { sys::ggml_threadpool_new(&mut params) })
            .map(ThreadPool)
            .ok_or_else(|| Error::BackendInit(format!("a pool of {threads} threads")))
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // SAFETY: owned pool, detached from every backend before (see Scheduler).
        unsafe { sys::ggml_threadpool_free(self.0.as_ptr()) }
    }
}

/// ggml's backend scheduler over a primary backend plus the CPU as fallback for
/// operations the primary one lacks.
pub struct Scheduler {
    ptr: NonNull<sys::ggml_backend_sched>,
    backends: Vec<Backend>,
    /// Declared last: dropped after the backends that use it.
    pool: Option<ThreadPool>,
    /// Threads in `pool`.
    pool_threads: usize,
}

// SAFETY: the scheduler is used from one thread at a time (`!Sync`).
unsafe impl Send for Scheduler {}

impl Scheduler {
    /// A scheduler over `primary` (and a CPU backend when `primary` is not the CPU),
    /// for graphs of up to `graph_size` nodes.
    pub fn new(primary: Backend, threads: usize, graph_size: usize) -> Result<Scheduler> {
        let mut backends = vec![primary];
        if !backends[0].is_cpu() {
            backends.push(Backend::cpu()?);
        }
        let mut raw: Vec<sys::ggml_backend_t> = backends.iter().map(|b| b.as_ptr()).collect();
        // SAFETY: valid backends, the last is the CPU as ggml requires.
        let ptr = unsafe {
            sys::ggml_backend_sched_new(
                raw.as_mut_ptr(),
                std::ptr::null_mut(),
                raw.len() as i32,
                graph_size,
                false,
                true,
            )
        };
        let ptr = NonNull::new(ptr).ok_or_else(|| Error::BackendInit("scheduler".into()))?;
        let mut sched = Scheduler {
            ptr,
            backends,
            pool: None,
            pool_threads: 0,
        };
        sched.set_n_threads(threads)?;
        Ok(sched)
    }

    pub fn primary(&self) -> &Backend {
        &self.backends[0]
    }

    /// Sets the CPU threads of every backend that has them; the CPU backend gets a new
    /// pool of that many threads.
    pub fn set_n_threads(&mut self, threads: usize) -> Result<()> {
        let pool = ThreadPool::new(threads)?;
        for b in &self.backends {
            b.set_n_threads(threads);
            if b.is_cpu() {
                // SAFETY: a CPU backend and a live pool, which outlives it (field order).
                unsafe { sys::ggml_backend_cpu_set_threadpool(b.as_ptr(), pool.0.as_ptr()) };
            }
        }
        // The previous pool is detached from every backend now.
        self.pool = Some(pool);
        self.pool_threads = threads;
        Ok(())
    }

    /// Runs the next graphs on `threads` of the pool's threads (at least one, at most
    /// the pool's); the others sleep meanwhile. For threads shared with other work
    /// graph by graph, without making a new pool each time.
    pub fn use_threads(&mut self, threads: usize) {
        let threads = threads.clamp(1, self.pool_threads.max(1));
        for b in &self.backends {
            b.set_n_threads(threads);
        }
    }

    /// Reserves compute buffers big enough for `graph` (call with the largest graph).
    pub fn reserve(&mut self, graph: &Graph<'_>) -> Result<()> {
        // SAFETY: valid scheduler and graph.
        if unsafe { sys::ggml_backend_sched_reserve(self.ptr.as_ptr(), graph.as_ptr()) } {
            Ok(())
        } else {
            Err(Error::GraphAlloc)
        }
    }

    /// Allocates the graph's intermediate tensors; after this, inputs can be written.
    pub fn alloc(&mut self, graph: &Graph<'_>) -> Result<()> {
        // SAFETY: valid scheduler and graph; reset releases the previous allocation.
        unsafe { sys::ggml_backend_sched_reset(self.ptr.as_ptr()) };
        if unsafe { sys::ggml_backend_sched_alloc_graph(self.ptr.as_ptr(), graph.as_ptr()) } {
            Ok(())
        } else {
            Err(Error::GraphAlloc)
        }
    }

    /// Runs an allocated graph.
    pub fn compute(&mut self, graph: &Graph<'_>) -> Result<()> {
        // SAFETY: valid scheduler and allocated graph.
        let status =
            unsafe { sys::ggml_backend_sched_graph_compute(self.ptr.as_ptr(), graph.as_ptr()) };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(Error::Compute(status));
        }
        Ok(())
    }

    /// Bytes of compute buffer the scheduler holds per backend.
    pub fn buffer_sizes(&self) -> Vec<(String, usize)> {
        self.backends
            .iter()
            .map(|b| {
                // SAFETY: valid scheduler and one of its backends.
                let n = unsafe {
                    sys::ggml_backend_sched_get_buffer_size(self.ptr.as_ptr(), b.as_ptr())
                };
                (b.device.spec(), n)
            })
            .collect()
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: owned scheduler, freed before its backends (field order).
        unsafe { sys::ggml_backend_sched_free(self.ptr.as_ptr()) }
    }
}

/// Silences ggml's log output below warnings (or entirely with `quiet`).
pub fn set_log_quiet(quiet: bool) {
    unsafe extern "C" fn filter(
        level: sys::ggml_log_level,
        text: *const std::ffi::c_char,
        _: *mut std::ffi::c_void,
    ) {
        if level >= sys::GGML_LOG_LEVEL_WARN && !text.is_null() {
            // SAFETY: ggml passes a NUL-terminated message.
            let msg = unsafe { CStr::from_ptr(text) };
            eprint!("{}", msg.to_string_lossy());
        }
    }
    unsafe extern "C" fn silent(
        _: sys::ggml_log_level,
        _: *const std::ffi::c_char,
        _: *mut std::ffi::c_void,
    ) {
    }
    // SAFETY: both callbacks are valid for the program's lifetime.
    unsafe {
        sys::ggml_log_set(
            Some(if quiet { silent } else { filter }),
            std::ptr::null_mut(),
        )
    };
}
