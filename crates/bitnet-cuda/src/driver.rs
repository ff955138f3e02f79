//! A thin RAII layer over the CUDA driver API as cudarc exposes it (`cudarc::driver::{result,
//! sys}`), loaded at run time. We do not use cudarc's safe `CudaSlice`/launch API: it records
//! events around every use, which breaks stream capture. Here every buffer is a plain device
//! pointer allocated up front, every launch is a raw `cuLaunchKernel`, and every call's result
//! is checked and turned into an [`Error`] that names the call.

use std::cell::RefCell;
use std::ffi::{c_void, CString};
use std::sync::Arc;

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use crate::error::{Error, Result};

pub(crate) fn ck<T>(r: std::result::Result<T, DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| {
        let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
        let msg = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Error::Driver(format!("{what}: {name} ({msg})"))
    })
}

/// Whether libcuda can be loaded and a device opened, without aborting when it cannot.
pub(crate) fn probe() -> std::result::Result<(), String> {
    // cudarc panics (inside a OnceLock) when it cannot load libcuda: probe the library first.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcuda (the NVIDIA driver library) was not found".into());
    }
    result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let n = result::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
    if n <= 0 {
        return Err("the driver reports no CUDA device".into());
    }
    Ok(())
}

/// A device's primary context, bound to the calling thread by [`Ctx::bind`].
pub(crate) struct Ctx {
    pub(crate) dev: sys::CUdevice,
    ctx: sys::CUcontext,
    pub(crate) name: String,
    pub(crate) cc: (i32, i32),
    pub(crate) sm_count: i32,
}

// SAFETY: a CUDA context may be used from any thread once made current there (`bind`).
unsafe impl Send for Ctx {}
unsafe impl Sync for Ctx {}

impl Ctx {
    pub(crate) fn new(ordinal: usize) -> Result<Arc<Ctx>> {
        probe().map_err(Error::Unavailable)?;
        let n = ck(result::device::get_count(), "cuDeviceGetCount")?;
        if ordinal >= n as usize {
            return Err(Error::Unavailable(format!("CUDA device {ordinal} requested, {n} present")));
        }
        let dev = ck(result::device::get(ordinal as i32), "cuDeviceGet")?;
        let ctx = ck(unsafe { result::primary_ctx::retain(dev) }, "cuDevicePrimaryCtxRetain")?;
        ck(unsafe { result::ctx::set_current(ctx) }, "cuCtxSetCurrent")?;
        let attr = |a| ck(unsafe { result::device::get_attribute(dev, a) }, "cuDeviceGetAttribute");
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sm_count = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let name = ck(result::device::get_name(dev), "cuDeviceGetName")?;
        Ok(Arc::new(Ctx { dev, ctx, name, cc: (major, minor), sm_count }))
    }

    /// Makes the context current on this thread (every entry point calls it).
    pub(crate) fn bind(&self) -> Result<()> {
        ck(unsafe { result::ctx::set_current(self.ctx) }, "cuCtxSetCurrent")
    }

    pub(crate) fn mem_info(&self) -> Result<(usize, usize)> {
        self.bind()?;
        ck(result::mem_get_info(), "cuMemGetInfo")
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        unsafe {
            let _ = result::primary_ctx::release(self.dev);
        }
    }
}

/// Device memory (untyped), freed on drop.
pub(crate) struct DevBuf {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<Ctx>,
}

unsafe impl Send for DevBuf {}

impl DevBuf {
    /// Uninitialized memory (at least 256 bytes are allocated, so size 0 is fine).
    pub(crate) fn alloc(ctx: &Arc<Ctx>, bytes: usize) -> Result<DevBuf> {
        ctx.bind()?;
        let ptr = ck(unsafe { result::malloc_sync(bytes.max(256)) }, "cuMemAlloc")
            .map_err(|e| Error::Driver(format!("{e} ({bytes} bytes)")))?;
        Ok(DevBuf { ptr, bytes, ctx: ctx.clone() })
    }
    /// Zero-filled memory.
    pub(crate) fn zeros(ctx: &Arc<Ctx>, bytes: usize) -> Result<DevBuf> {
        let b = DevBuf::alloc(ctx, bytes)?;
        ck(unsafe { result::memset_d8_sync(b.ptr, 0, bytes.max(256)) }, "cuMemsetD8")?;
        // The "synchronous" memset and copies run on the legacy stream, which our non-blocking
        // streams do not wait for (and may return before the DMA is done): finish them here.
        ck(result::ctx::synchronize(), "cuCtxSynchronize")?;
        Ok(b)
    }
    /// A buffer holding a copy of `data` (synchronous).
    pub(crate) fn from_slice<T: Copy>(ctx: &Arc<Ctx>, data: &[T]) -> Result<DevBuf> {
        let b = DevBuf::alloc(ctx, std::mem::size_of_val(data))?;
        b.upload(data)?;
        Ok(b)
    }
    pub(crate) fn ptr(&self) -> u64 {
        self.ptr
    }
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
    /// Synchronous host -> device copy to the start of the buffer.
    pub(crate) fn upload<T: Copy>(&self, data: &[T]) -> Result<()> {
        let n = std::mem::size_of_val(data);
        if n > self.bytes {
            return Err(Error::Internal(format!("upload of {n} bytes into a buffer of {}", self.bytes)));
        }
        if n == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        ck(unsafe { result::memcpy_htod_sync(self.ptr, data) }, "cuMemcpyHtoD")?;
        ck(result::ctx::synchronize(), "cuCtxSynchronize")
    }
    /// Synchronous device -> host copy from `offset` bytes in. It runs on the legacy stream:
    /// the caller first waits for the work that wrote the buffer.
    pub(crate) fn download_at<T: Copy>(&self, offset: usize, out: &mut [T]) -> Result<()> {
        let n = std::mem::size_of_val(out);
        if offset + n > self.bytes {
            return Err(Error::Internal(format!("download of {n} bytes at {offset} from a buffer of {}", self.bytes)));
        }
        if n == 0 {
            return Ok(());
        }
        self.ctx.bind()?;
        ck(unsafe { result::memcpy_dtoh_sync(out, self.ptr + offset as u64) }, "cuMemcpyDtoH")
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        unsafe {
            let _ = self.ctx.bind();
            let _ = result::free_sync(self.ptr);
        }
    }
}

/// Page-locked host memory (truly asynchronous copies), freed on drop.
pub(crate) struct HostBuf<T: Copy> {
    ptr: *mut T,
    len: usize,
    ctx: Arc<Ctx>,
}

unsafe impl<T: Copy + Send> Send for HostBuf<T> {}

impl<T: Copy + Default> HostBuf<T> {
    pub(crate) fn new(ctx: &Arc<Ctx>, len: usize) -> Result<HostBuf<T>> {
        ctx.bind()?;
        let bytes = (len.max(1)) * std::mem::size_of::<T>();
        let p = ck(unsafe { result::malloc_host(bytes, 0) }, "cuMemHostAlloc")? as *mut T;
        for i in 0..len.max(1) {
            // SAFETY: freshly allocated, `len.max(1)` elements.
            unsafe { p.add(i).write(T::default()) };
        }
        Ok(HostBuf { ptr: p, len, ctx: ctx.clone() })
    }
    pub(crate) fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialized elements, owned.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Copy> Drop for HostBuf<T> {
    fn drop(&mut self) {
        unsafe {
            let _ = self.ctx.bind();
            let _ = result::free_host(self.ptr as *mut c_void);
        }
    }
}

/// A non-blocking stream (capturable: never the legacy NULL stream).
pub(crate) struct Stream {
    pub(crate) s: sys::CUstream,
    ctx: Arc<Ctx>,
    /// While `Some`: every kernel launched on this stream is bracketed by two timing events
    /// (diagnostics only; never while capturing a graph, never in the timed benchmark).
    prof: RefCell<Option<Vec<Timed>>>,
    /// Launch kernels with programmatic stream serialization (sm_90+; kernels.cu PDL_WAIT).
    pub(crate) pdl: bool,
}

/// One profiled launch: its kernel, grid and the events around it.
pub(crate) struct Timed {
    pub(crate) name: String,
    pub(crate) grid: (u32, u32, u32),
    start: Event,
    end: Event,
}

impl Timed {
    pub(crate) fn ms(&self) -> Result<f32> {
        self.start.elapsed_ms(&self.end)
    }
}

unsafe impl Send for Stream {}

impl Stream {
    pub(crate) fn new(ctx: &Arc<Ctx>) -> Result<Stream> {
        ctx.bind()?;
        let s = ck(result::stream::create(result::stream::StreamKind::NonBlocking), "cuStreamCreate")?;
        Ok(Stream { s, ctx: ctx.clone(), prof: RefCell::new(None), pdl: false })
    }
    /// Starts (or restarts) timing every launch on this stream.
    pub(crate) fn profile_start(&self) {
        *self.prof.borrow_mut() = Some(Vec::new());
    }
    /// Stops timing; waits for the stream and returns what was timed since `profile_start`.
    pub(crate) fn profile_take(&self) -> Result<Vec<Timed>> {
        let v = self.prof.borrow_mut().take().unwrap_or_default();
        self.sync()?;
        Ok(v)
    }
    pub(crate) fn sync(&self) -> Result<()> {
        ck(unsafe { result::stream::synchronize(self.s) }, "cuStreamSynchronize")
    }
    pub(crate) fn wait(&self, e: &Event) -> Result<()> {
        ck(
            unsafe { result::stream::wait_event(self.s, e.e, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) },
            "cuStreamWaitEvent",
        )
    }
    /// Asynchronous host -> device copy (`src` must stay valid until the copy is done: pinned
    /// staging buffers, synchronized through events).
    pub(crate) fn htod<T: Copy>(&self, dst: u64, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        ck(unsafe { result::memcpy_htod_async(dst, src, self.s) }, "cuMemcpyHtoDAsync")
    }
    /// Asynchronous device -> host copy.
    pub(crate) fn dtoh<T: Copy>(&self, dst: &mut [T], src: u64) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        ck(unsafe { result::memcpy_dtoh_async(dst, src, self.s) }, "cuMemcpyDtoHAsync")
    }
    pub(crate) fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        ck(unsafe { result::memcpy_dtod_async(dst, src, bytes, self.s) }, "cuMemcpyDtoDAsync")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        unsafe {
            let _ = self.ctx.bind();
            let _ = result::stream::synchronize(self.s);
            let _ = result::stream::destroy(self.s);
        }
    }
}

/// An event (timing disabled unless asked: cheaper for ordering).
pub(crate) struct Event {
    e: sys::CUevent,
    ctx: Arc<Ctx>,
}

unsafe impl Send for Event {}

impl Event {
    pub(crate) fn new(ctx: &Arc<Ctx>, timing: bool) -> Result<Event> {
        ctx.bind()?;
        let flags =
            if timing { sys::CUevent_flags::CU_EVENT_DEFAULT } else { sys::CUevent_flags::CU_EVENT_DISABLE_TIMING };
        let e = ck(result::event::create(flags), "cuEventCreate")?;
        Ok(Event { e, ctx: ctx.clone() })
    }
    pub(crate) fn record(&self, s: &Stream) -> Result<()> {
        ck(unsafe { result::event::record(self.e, s.s) }, "cuEventRecord")
    }
    pub(crate) fn sync(&self) -> Result<()> {
        ck(unsafe { result::event::synchronize(self.e) }, "cuEventSynchronize")
    }
    /// Milliseconds from `self` to `end` (both recorded with timing and completed).
    pub(crate) fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        ck(unsafe { result::event::elapsed(self.e, end.e) }, "cuEventElapsedTime")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        unsafe {
            let _ = self.ctx.bind();
            let _ = result::event::destroy(self.e);
        }
    }
}

/// A loaded module (cubin or PTX image).
pub(crate) struct Module {
    m: sys::CUmodule,
    ctx: Arc<Ctx>,
}

unsafe impl Send for Module {}

impl Module {
    /// Loads a cubin (any bytes) or a PTX text (must end with a NUL byte).
    pub(crate) fn load(ctx: &Arc<Ctx>, image: &[u8]) -> Result<Module> {
        ctx.bind()?;
        let m = ck(unsafe { result::module::load_data(image.as_ptr() as *const c_void) }, "cuModuleLoadData")?;
        Ok(Module { m, ctx: ctx.clone() })
    }
    pub(crate) fn function(&self, name: &str) -> Result<Kernel> {
        let c = CString::new(name).map_err(|_| Error::Internal("kernel name".into()))?;
        let f = ck(unsafe { result::module::get_function(self.m, c) }, &format!("cuModuleGetFunction({name})"))?;
        Ok(Kernel { f, name: name.to_string() })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        unsafe {
            let _ = self.ctx.bind();
            let _ = result::module::unload(self.m);
        }
    }
}

/// A kernel of a [`Module`] (valid while the module lives: both sit in [`crate::gpu::Gpu`]).
#[derive(Clone)]
pub(crate) struct Kernel {
    f: sys::CUfunction,
    pub(crate) name: String,
}

unsafe impl Send for Kernel {}

impl Kernel {
    /// Allows up to `bytes` of dynamic shared memory (needed above 48 KiB).
    pub(crate) fn set_max_dynamic_smem(&self, bytes: usize) -> Result<()> {
        ck(
            unsafe {
                result::function::set_function_attribute(
                    self.f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            },
            &format!("cuFuncSetAttribute({})", self.name),
        )
    }

    /// `cuLaunchKernel` with `params` pointing at each argument (values copied at the call).
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and size, and every
    /// device pointer among them must be valid for what the kernel does with it.
    pub(crate) unsafe fn launch(
        &self,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        stream: &Stream,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let mut prof = stream.prof.borrow_mut();
        let timed = match prof.as_mut() {
            Some(v) => {
                let (start, end) = (Event::new(&stream.ctx, true)?, Event::new(&stream.ctx, true)?);
                start.record(stream)?;
                v.push(Timed { name: self.name.clone(), grid, start, end });
                v.last()
            }
            None => None,
        };
        if stream.pdl {
            let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
            attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            let cfg = sys::CUlaunchConfig {
                gridDimX: grid.0,
                gridDimY: grid.1,
                gridDimZ: grid.2,
                blockDimX: block,
                blockDimY: 1,
                blockDimZ: 1,
                sharedMemBytes: smem,
                hStream: stream.s,
                attrs: &mut attr,
                numAttrs: 1,
            };
            ck(
                sys::cuLaunchKernelEx(&cfg, self.f, params.as_mut_ptr(), std::ptr::null_mut()).result(),
                &format!("cuLaunchKernelEx({})", self.name),
            )?;
        } else {
            ck(
                result::launch_kernel(self.f, grid, (block, 1, 1), smem, stream.s, params),
                &format!("cuLaunchKernel({})", self.name),
            )?;
        }
        if let Some(t) = timed {
            t.end.record(stream)?;
        }
        Ok(())
    }
}

/// Launches `$k` with each argument copied into a temporary that lives until the call
/// returns (`cuLaunchKernel` reads the values during the call). Argument types must match the
/// kernel's C types exactly: `u64` for pointers and `size_t`, `i32` for `int`, `f32` for `float`.
macro_rules! launch {
    ($k:expr, $grid:expr, $block:expr, $smem:expr, $stream:expr; $($arg:expr),* $(,)?) => {{
        #[allow(unused_unsafe)]
        unsafe {
            $k.launch(
                $grid,
                $block,
                $smem,
                $stream,
                &mut [$(&mut { $arg } as *mut _ as *mut ::std::ffi::c_void),*],
            )
        }
    }};
}
pub(crate) use launch;

/// An instantiated CUDA graph.
pub(crate) struct GraphExec {
    exec: sys::CUgraphExec,
    ctx: Arc<Ctx>,
}

unsafe impl Send for GraphExec {}

impl GraphExec {
    /// Captures what `body` enqueues on `stream` (thread-local capture mode: a forbidden call
    /// such as an allocation on this thread fails instead of silently breaking the graph).
    pub(crate) fn capture(ctx: &Arc<Ctx>, stream: &Stream, body: impl FnOnce() -> Result<()>) -> Result<GraphExec> {
        ctx.bind()?;
        ck(
            unsafe {
                result::stream::begin_capture(stream.s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            },
            "cuStreamBeginCapture",
        )?;
        let r = body();
        let g = unsafe { result::stream::end_capture(stream.s) };
        let graph = match (r, g) {
            (Ok(()), Ok(graph)) => graph,
            (Err(e), g) => {
                if let Ok(graph) = g {
                    if !graph.is_null() {
                        unsafe {
                            let _ = result::graph::destroy(graph);
                        }
                    }
                }
                return Err(e);
            }
            (Ok(()), Err(e)) => return ck(Err(e), "cuStreamEndCapture"),
        };
        let exec = unsafe { result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)) };
        unsafe {
            let _ = result::graph::destroy(graph);
        }
        let exec = ck(exec, "cuGraphInstantiate")?;
        Ok(GraphExec { exec, ctx: ctx.clone() })
    }
    pub(crate) fn launch(&self, stream: &Stream) -> Result<()> {
        ck(unsafe { result::graph::launch(self.exec, stream.s) }, "cuGraphLaunch")
    }
}

impl Drop for GraphExec {
    fn drop(&mut self) {
        unsafe {
            let _ = self.ctx.bind();
            let _ = result::graph::exec_destroy(self.exec);
        }
    }
}
