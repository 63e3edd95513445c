//! Contexts, tensors and the graph-building operations.
//!
//! A [`Context`] holds tensor *metadata* only (ggml's `no_alloc` mode): the data of
//! weights lives in backend buffers ([`crate::Buffer`]) and the data of intermediate
//! results in the scheduler's compute buffers. Operations check the shapes ggml
//! would assert on, so that bad input gives an [`Error`] instead of an abort.
use crate::error::shape;
use crate::{Error, Result, Type, sys};
use std::ffi::{CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;

/// A bit of a tensor's `flags` that ggml leaves alone (it uses the low five), set on
/// the tensors of a [`crate::SharedStore`]: their data and fields are never written again.
const READ_ONLY: i32 = 1 << 24;

/// Most sources a custom op takes (ggml asserts fewer than `GGML_MAX_SRC`).
pub(crate) const MAX_CUSTOM_ARGS: usize = sys::GGML_MAX_SRC as usize - 1;

/// Owner of a `ggml_context` holding tensor and graph metadata.
pub struct Context {
    ptr: NonNull<sys::ggml_context>,
    capacity: usize,
}

// SAFETY: a ggml context is plain memory owned by this value; it is only mutated
// through `&self` methods from one thread at a time because `Context: !Sync`.
unsafe impl Send for Context {}

impl Context {
    /// A metadata-only context with room for `max_tensors` tensors and one graph
    /// of `graph_size` nodes (0 for none).
    pub fn new(max_tensors: usize, graph_size: usize) -> Result<Context> {
        // SAFETY: pure size computations.
        let mut mem = max_tensors * unsafe { sys::ggml_tensor_overhead() };
        if graph_size > 0 {
            mem += unsafe { sys::ggml_graph_overhead_custom(graph_size, false) };
        }
        mem += 1024;
        let params = sys::ggml_init_params {
            mem_size: mem,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: params are valid; a null return is handled.
        let ptr =
            NonNull::new(unsafe { sys::ggml_init(params) }).ok_or(Error::ContextAlloc(mem))?;
        Ok(Context {
            ptr,
            capacity: max_tensors,
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_context {
        self.ptr.as_ptr()
    }

    pub(crate) fn room(&self) -> Result<()> {
        // SAFETY: valid context.
        let free =
            unsafe { sys::ggml_get_mem_size(self.as_ptr()) - sys::ggml_used_mem(self.as_ptr()) };
        // SAFETY: pure size computation.
        if free < unsafe { sys::ggml_tensor_overhead() } {
            return Err(Error::ContextFull(self.capacity));
        }
        Ok(())
    }

    pub(crate) fn wrap(&self, op: &'static str, raw: *mut sys::ggml_tensor) -> Result<Tensor<'_>> {
        NonNull::new(raw)
            .map(|ptr| Tensor {
                ptr,
                _ctx: PhantomData,
            })
            .ok_or_else(|| shape(op, "ggml returned no tensor"))
    }

    /// A new tensor with shape `ne` in ggml order (innermost dimension first, 1 to 4 dims).
    pub fn new_tensor(&self, ty: Type, ne: &[usize]) -> Result<Tensor<'_>> {
        if ne.is_empty() || ne.len() > 4 {
            return Err(shape(
                "new_tensor",
                format!("{} dimensions (ggml has 1 to 4)", ne.len()),
            ));
        }
        if ne.iter().any(|&d| d == 0 || d > i64::MAX as usize) {
            return Err(shape("new_tensor", format!("invalid shape {ne:?}")));
        }
        ty.nbytes(ne)?;
        self.room()?;
        let dims: Vec<i64> = ne.iter().map(|&d| d as i64).collect();
        // SAFETY: valid context with room; dims has ne.len() entries.
        let raw = unsafe {
            sys::ggml_new_tensor(self.as_ptr(), ty.raw(), dims.len() as i32, dims.as_ptr())
        };
        self.wrap("new_tensor", raw)
    }

    /// A new named tensor, see [`Context::new_tensor`].
    pub fn new_named(&self, name: &str, ty: Type, ne: &[usize]) -> Result<Tensor<'_>> {
        let t = self.new_tensor(ty, ne)?;
        t.set_name(name);
        Ok(t)
    }

    /// A tensor that receives data from the host before each compute.
    pub fn input(&self, name: &str, ty: Type, ne: &[usize]) -> Result<Tensor<'_>> {
        let t = self.new_named(name, ty, ne)?;
        // SAFETY: valid tensor.
        unsafe { sys::ggml_set_input(t.as_ptr()) };
        Ok(t)
    }

    /// Iterates over the tensors of this context.
    pub fn tensors(&self) -> impl Iterator<Item = Tensor<'_>> {
        // SAFETY: valid context; ggml_get_next_tensor walks its object list.
        let mut cur = unsafe { sys::ggml_get_first_tensor(self.as_ptr()) };
        std::iter::from_fn(move || {
            let t = NonNull::new(cur)?;
            // SAFETY: `cur` is a tensor of this context.
            cur = unsafe { sys::ggml_get_next_tensor(self.as_ptr(), cur) };
            Some(Tensor {
                ptr: t,
                _ctx: PhantomData,
            })
        })
    }

    /// A tensor of this context by name.
    pub fn get(&self, name: &str) -> Option<Tensor<'_>> {
        let c = CString::new(name).ok()?;
        // SAFETY: valid context and C string.
        NonNull::new(unsafe { sys::ggml_get_tensor(self.as_ptr(), c.as_ptr()) }).map(|ptr| Tensor {
            ptr,
            _ctx: PhantomData,
        })
    }

    /// A new graph with room for `size` nodes.
    pub fn graph(&self, size: usize) -> Result<Graph<'_>> {
        // SAFETY: valid context; a graph that does not fit asserts in ggml, so check first.
        let need = unsafe { sys::ggml_graph_overhead_custom(size, false) };
        let free =
            unsafe { sys::ggml_get_mem_size(self.as_ptr()) - sys::ggml_used_mem(self.as_ptr()) };
        if free < need {
            return Err(Error::GraphFull(size));
        }
        let ptr = unsafe { sys::ggml_new_graph_custom(self.as_ptr(), size, false) };
        Ok(Graph {
            ptr: NonNull::new(ptr).ok_or(Error::GraphFull(size))?,
            size,
            held: Default::default(),
            _ctx: PhantomData,
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: owned context, freed once.
        unsafe { sys::ggml_free(self.as_ptr()) }
    }
}

/// A tensor of a [`Context`] (metadata; the data lives in a backend buffer).
#[derive(Clone, Copy)]
pub struct Tensor<'a> {
    pub(crate) ptr: NonNull<sys::ggml_tensor>,
    pub(crate) _ctx: PhantomData<&'a Context>,
}

impl<'a> Tensor<'a> {
    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }

    fn raw(&self) -> &sys::ggml_tensor {
        // SAFETY: the tensor lives as long as its context ('a).
        unsafe { self.ptr.as_ref() }
    }

    pub fn ty(&self) -> Type {
        Type::from_raw(self.raw().type_).expect("tensor of a known type")
    }

    /// Shape in ggml order (innermost first), always 4 entries.
    pub fn ne(&self) -> [usize; 4] {
        self.raw().ne.map(|d| d as usize)
    }

    /// Strides in bytes.
    pub fn nb(&self) -> [usize; 4] {
        self.raw().nb
    }

    /// Shape without trailing 1s (at least one entry).
    pub fn shape(&self) -> Vec<usize> {
        let ne = self.ne();
        let mut n = 4;
        while n > 1 && ne[n - 1] == 1 {
            n -= 1;
        }
        ne[..n].to_vec()
    }

    pub fn nelements(&self) -> usize {
        self.ne().iter().product()
    }

    pub fn nbytes(&self) -> usize {
        // SAFETY: valid tensor.
        unsafe { sys::ggml_nbytes(self.as_ptr()) }
    }

    pub fn name(&self) -> String {
        // SAFETY: ggml keeps a NUL-terminated name inside the tensor.
        unsafe { CStr::from_ptr(self.raw().name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Whether the tensor's data belongs to a [`crate::SharedStore`]: the tensor's own or
    /// that of the tensor it views (at any depth).
    pub fn is_read_only(&self) -> bool {
        let mut p = self.as_ptr();
        while !p.is_null() {
            // SAFETY: the tensor and those it views live as long as its context.
            let (flags, view_src) = unsafe { ((*p).flags, (*p).view_src) };
            if flags & READ_ONLY != 0 {
                return true;
            }
            p = view_src;
        }
        false
    }

    /// Whether the tensor is an op's result (not a leaf made with `new_named`/`input`).
    pub(crate) fn is_op(&self) -> bool {
        self.raw().op != sys::GGML_OP_NONE
    }

    /// Marks a tensor as a [`crate::SharedStore`]'s (see [`Tensor::is_read_only`]).
    pub(crate) fn mark_read_only(&self) {
        // SAFETY: valid tensor, not shared yet (its store is being made a SharedStore).
        unsafe { (*self.as_ptr()).flags |= READ_ONLY };
    }

    /// Panics on a tensor of a shared store: other threads read its fields (a
    /// programming error, never a consequence of input).
    fn assert_own(&self, what: &str) {
        // SAFETY: valid tensor.
        assert!(
            unsafe { (*self.as_ptr()).flags } & READ_ONLY == 0,
            "{what} of {:?}, a tensor of a shared store",
            self.name()
        );
    }

    /// Sets the name (truncated to ggml's 63 bytes).
    ///
    /// # Panics
    /// On a tensor of a [`crate::SharedStore`].
    pub fn set_name(&self, name: &str) {
        self.assert_own("set_name");
        let clean: String = name.chars().filter(|&c| c != '\0').collect();
        let c = CString::new(clean).expect("NUL bytes removed");
        // SAFETY: valid tensor and C string; ggml copies and truncates.
        unsafe { sys::ggml_set_name(self.as_ptr(), c.as_ptr()) };
    }

    /// Marks the tensor as a graph output so the allocator keeps its data.
    ///
    /// # Panics
    /// On a tensor of a [`crate::SharedStore`].
    pub fn set_output(&self) {
        self.assert_own("set_output");
        // SAFETY: valid tensor.
        unsafe { sys::ggml_set_output(self.as_ptr()) }
    }

    pub fn is_contiguous(&self) -> bool {
        // SAFETY: valid tensor.
        unsafe { sys::ggml_is_contiguous(self.as_ptr()) }
    }

    /// Whether the tensor has data in a backend buffer.
    pub fn is_allocated(&self) -> bool {
        !self.raw().buffer.is_null()
    }

    fn check_allocated(&self) -> Result<()> {
        if self.is_allocated() {
            Ok(())
        } else {
            Err(Error::NotAllocated(self.name()))
        }
    }

    /// Copies raw bytes into the tensor's backend buffer (all of it).
    pub fn write_bytes(&self, data: &[u8]) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly(self.name()));
        }
        self.check_allocated()?;
        let n = self.nbytes();
        if data.len() != n || !self.is_contiguous() {
            return Err(Error::DataSize {
                name: self.name(),
                got: data.len(),
                expected: n,
            });
        }
        // SAFETY: allocated contiguous tensor with exactly `n` bytes; source has `n` bytes.
        unsafe { sys::ggml_backend_tensor_set(self.as_ptr(), data.as_ptr().cast(), 0, n) };
        Ok(())
    }

    /// Writes f32 values into an F32 tensor.
    pub fn write_f32(&self, data: &[f32]) -> Result<()> {
        self.expect_type(Type::F32, "write_f32")?;
        self.write_bytes(as_bytes(data))
    }

    /// Writes i32 values into an I32 tensor.
    pub fn write_i32(&self, data: &[i32]) -> Result<()> {
        self.expect_type(Type::I32, "write_i32")?;
        self.write_bytes(as_bytes(data))
    }

    fn expect_type(&self, ty: Type, op: &'static str) -> Result<()> {
        if self.ty() != ty {
            return Err(shape(
                op,
                format!("tensor {:?} is {}, expected {}", self.name(), self.ty(), ty),
            ));
        }
        Ok(())
    }

    /// Reads the tensor's bytes from its backend buffer.
    pub fn read_bytes(&self) -> Result<Vec<u8>> {
        self.check_allocated()?;
        if !self.is_contiguous() {
            return Err(shape(
                "read_bytes",
                format!("tensor {:?} is not contiguous", self.name()),
            ));
        }
        let mut out = vec![0u8; self.nbytes()];
        // SAFETY: allocated contiguous tensor of out.len() bytes.
        unsafe {
            sys::ggml_backend_tensor_get(self.as_ptr(), out.as_mut_ptr().cast(), 0, out.len())
        };
        Ok(out)
    }

    /// Reads the tensor as f32 values, dequantizing or converting as needed.
    pub fn read_f32(&self) -> Result<Vec<f32>> {
        let bytes = self.read_bytes()?;
        crate::quant::to_f32(self.ty(), &bytes, self.nelements())
    }
}

impl std::fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {:?})",
            self.name(),
            self.ty(),
            self.shape()
        )
    }
}

pub(crate) fn as_bytes<T: bytemuck_lite::Pod>(data: &[T]) -> &[u8] {
    // SAFETY: Pod types have no padding and any bit pattern is valid as bytes.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), std::mem::size_of_val(data)) }
}

pub(crate) mod bytemuck_lite {
    /// Plain numeric types whose bytes may be viewed directly.
    pub trait Pod: Copy {}
    impl Pod for f32 {}
    impl Pod for i32 {}
}

/// A computation graph built from tensors of a context.
pub struct Graph<'a> {
    ptr: NonNull<sys::ggml_cgraph>,
    size: usize,
    /// Every tensor the graph holds (nodes and leaves), so that each expansion walks
    /// only what it adds: walking the whole graph again for every layer's expansion was
    /// 2-3% of the demo model's time.
    held: std::collections::HashSet<*mut sys::ggml_tensor>,
    _ctx: PhantomData<&'a Context>,
}

impl<'a> Graph<'a> {
    pub(crate) fn as_ptr(&self) -> *mut sys::ggml_cgraph {
        self.ptr.as_ptr()
    }

    /// Adds `t` and everything it depends on.
    pub fn expand(&mut self, t: Tensor<'_>) -> Result<()> {
        // ggml asserts when the graph overflows: the tensors not held yet bound what is
        // added. Nodes and leaves have `size` slots each; `held` has both.
        let before = self.n_nodes();
        let leaves = self.held.len().saturating_sub(before);
        let new = self.new_tensors(t);
        if before.max(leaves) + new.len() > self.size {
            return Err(Error::GraphFull(self.size));
        }
        // SAFETY: valid graph and tensor; capacity checked above.
        unsafe { sys::ggml_build_forward_expand(self.as_ptr(), t.as_ptr()) };
        self.held.extend(new);
        Ok(())
    }

    /// The tensors `t` depends on (itself included) that the graph does not hold yet:
    /// an upper bound on the nodes expanding it adds.
    fn new_tensors(&self, t: Tensor<'_>) -> std::collections::HashSet<*mut sys::ggml_tensor> {
        let mut new = std::collections::HashSet::new();
        let mut stack = vec![t.as_ptr()];
        while let Some(p) = stack.pop() {
            if p.is_null() || self.held.contains(&p) || !new.insert(p) {
                continue;
            }
            // SAFETY: p is a tensor reachable from a valid tensor.
            let src = unsafe { (*p).src };
            stack.extend(src.iter().copied().filter(|s| !s.is_null()));
        }
        new
    }

    pub fn n_nodes(&self) -> usize {
        // SAFETY: valid graph.
        unsafe { sys::ggml_graph_n_nodes(self.as_ptr()) as usize }
    }
}

/// Operations. Each mirrors the ggml function of the same name and checks the
/// conditions ggml would assert on.
impl Context {
    /// Wraps an op's result; callers check `room` before calling ggml.
    fn same_ctx<'s>(&'s self, op: &'static str, raw: *mut sys::ggml_tensor) -> Result<Tensor<'s>> {
        self.wrap(op, raw)
    }

    /// `a^T b`: a is [k, m], b is [k, n, ...] -> [m, n, ...].
    pub fn mul_mat<'s>(&'s self, a: Tensor<'_>, b: Tensor<'_>) -> Result<Tensor<'s>> {
        let (x, y) = (a.ne(), b.ne());
        if x[0] != y[0] || y[2] % x[2] != 0 || y[3] % x[3] != 0 || a.nb()[0] > a.nb()[1] {
            return Err(shape(
                "mul_mat",
                format!("{:?} x {:?}", a.shape(), b.shape()),
            ));
        }
        self.room()?;
        // SAFETY: shapes checked as ggml_can_mul_mat does.
        self.same_ctx("mul_mat", unsafe {
            sys::ggml_mul_mat(self.as_ptr(), a.as_ptr(), b.as_ptr())
        })
    }

    fn broadcast_check(op: &'static str, a: Tensor<'_>, b: Tensor<'_>) -> Result<()> {
        let (x, y) = (a.ne(), b.ne());
        if (0..4).any(|i| x[i] % y[i] != 0) {
            return Err(shape(
                op,
                format!("cannot broadcast {:?} onto {:?}", b.shape(), a.shape()),
            ));
        }
        Ok(())
    }

    /// `a + b`, b broadcast over a.
    pub fn add<'s>(&'s self, a: Tensor<'_>, b: Tensor<'_>) -> Result<Tensor<'s>> {
        Self::broadcast_check("add", a, b)?;
        self.room()?;
        // SAFETY: broadcast checked.
        self.same_ctx("add", unsafe {
            sys::ggml_add(self.as_ptr(), a.as_ptr(), b.as_ptr())
        })
    }

    /// `a * b` elementwise, b broadcast over a.
    pub fn mul<'s>(&'s self, a: Tensor<'_>, b: Tensor<'_>) -> Result<Tensor<'s>> {
        Self::broadcast_check("mul", a, b)?;
        self.room()?;
        // SAFETY: broadcast checked.
        self.same_ctx("mul", unsafe {
            sys::ggml_mul(self.as_ptr(), a.as_ptr(), b.as_ptr())
        })
    }

    /// `a / b`, `b` broadcast like in [`Context::mul`].
    pub fn div<'s>(&'s self, a: Tensor<'_>, b: Tensor<'_>) -> Result<Tensor<'s>> {
        Self::broadcast_check("div", a, b)?;
        self.room()?;
        // SAFETY: broadcast checked.
        self.same_ctx("div", unsafe {
            sys::ggml_div(self.as_ptr(), a.as_ptr(), b.as_ptr())
        })
    }

    /// `a * s`.
    pub fn scale<'s>(&'s self, a: Tensor<'_>, s: f32) -> Result<Tensor<'s>> {
        self.room()?;
        // SAFETY: any tensor.
        self.same_ctx("scale", unsafe {
            sys::ggml_scale(self.as_ptr(), a.as_ptr(), s)
        })
    }

    /// Unary functions on f32 tensors.
    pub fn gelu<'s>(&'s self, a: Tensor<'_>) -> Result<Tensor<'s>> {
        self.room()?;
        // SAFETY: any tensor (ggml's gelu is the tanh approximation).
        self.same_ctx("gelu", unsafe { sys::ggml_gelu(self.as_ptr(), a.as_ptr()) })
    }

    /// GELU with the tanh approximation, `0.5 x (1 + tanh(u))` with
    /// `u = sqrt(2/pi) (x + 0.044715 x^3)`, computed in f32 from primitives. ggml's own
    /// `gelu` reads a table indexed by the f16-rounded input (about 1e-3 relative error),
    /// too coarse to match a reference to 1e-4; and its `tanh` is scalar libm. So it is
    /// written with ggml's vectorised SiLU: `0.5 (1 + tanh(u)) = sigmoid(2u)` and
    /// `x sigmoid(2u) = silu(2u) / d` with `d = 2u / x = 2 sqrt(2/pi) (1 + 0.044715 x^2)`,
    /// which is never below 1.59, so the division is safe for every x. Times `times`
    /// (same shape) if given: Gemma's gated MLP.
    pub fn gelu_precise<'s>(
        &'s self,
        x: Tensor<'_>,
        times: Option<Tensor<'_>>,
    ) -> Result<Tensor<'s>> {
        const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
        let x2 = self.sqr(x)?;
        self.room()?;
        // SAFETY: any tensor. d = TWO_SQRT_2_OVER_PI * (1 + 0.044715 x^2)
        let d = self.same_ctx("scale_bias", unsafe {
            sys::ggml_scale_bias(
                self.as_ptr(),
                x2.as_ptr(),
                TWO_SQRT_2_OVER_PI * 0.044715,
                TWO_SQRT_2_OVER_PI,
            )
        })?;
        let two_u = self.mul(x, d)?;
        let g = self.div(self.silu(two_u)?, d)?;
        match times {
            Some(y) => self.mul(g, y),
            None => Ok(g),
        }
    }

    pub fn sqr<'s>(&'s self, a: Tensor<'_>) -> Result<Tensor<'s>> {
        self.room()?;
        // SAFETY: any tensor.
        self.same_ctx("sqr", unsafe { sys::ggml_sqr(self.as_ptr(), a.as_ptr()) })
    }

    pub fn silu<'s>(&'s self, a: Tensor<'_>) -> Result<Tensor<'s>> {
        self.room()?;
        // SAFETY: any tensor.
        self.same_ctx("silu", unsafe { sys::ggml_silu(self.as_ptr(), a.as_ptr()) })
    }

    pub fn relu<'s>(&'s self, a: Tensor<'_>) -> Result<Tensor<'s>> {
        self.room()?;
        // SAFETY: any tensor.
        self.same_ctx("relu", unsafe { sys::ggml_relu(self.as_ptr(), a.as_ptr()) })
    }

    /// RMS normalisation over the innermost dimension.
    pub fn rms_norm<'s>(&'s self, a: Tensor<'_>, eps: f32) -> Result<Tensor<'s>> {
        self.room()?;
        // SAFETY: any tensor.
        self.same_ctx("rms_norm", unsafe {
            sys::ggml_rms_norm(self.as_ptr(), a.as_ptr(), eps)
        })
    }

    /// Layer normalisation (no affine part) over the innermost dimension.
    pub fn norm<'s>(&'s self, a: Tensor<'_>, eps: f32) -> Result<Tensor<'s>> {
        self.room()?;
        // SAFETY: any tensor.
        self.same_ctx("norm", unsafe {
            sys::ggml_norm(self.as_ptr(), a.as_ptr(), eps)
        })
    }

    /// `softmax(a * scale + mask)` over the innermost dimension. The mask (F16 or
    /// F32, [n_kv, n_q padded]) broadcasts over heads.
    pub fn soft_max_ext<'s>(
        &'s self,
        a: Tensor<'_>,
        mask: Option<Tensor<'_>>,
        scale: f32,
    ) -> Result<Tensor<'s>> {
        if let Some(m) = mask {
            let (x, y) = (a.ne(), m.ne());
            if y[0] != x[0] || y[1] < x[1] || x[2] % y[2] != 0 || x[3] % y[3] != 0 {
                return Err(shape(
                    "soft_max_ext",
                    format!("mask {:?} for scores {:?}", m.shape(), a.shape()),
                ));
            }
        }
        self.room()?;
        let m = mask.map_or(std::ptr::null_mut(), |m| m.as_ptr());
        // SAFETY: mask shape checked.
        self.same_ctx("soft_max_ext", unsafe {
            sys::ggml_soft_max_ext(self.as_ptr(), a.as_ptr(), m, scale, 0.0)
        })
    }

    /// NeoX-style rotary embedding of a [head_dim, n_head, n_tokens] tensor with
    /// one I32 position per token.
    pub fn rope_neox<'s>(
        &'s self,
        a: Tensor<'_>,
        pos: Tensor<'_>,
        n_dims: usize,
        theta: f32,
    ) -> Result<Tensor<'s>> {
        if pos.ty() != Type::I32
            || pos.ne()[0] != a.ne()[2]
            || n_dims > a.ne()[0]
            || !n_dims.is_multiple_of(2)
        {
            return Err(shape(
                "rope",
                format!("{:?} with positions {:?}", a.shape(), pos.shape()),
            ));
        }
        self.room()?;
        // SAFETY: checked as ggml_rope_impl asserts.
        let raw = unsafe {
            sys::ggml_rope_ext(
                self.as_ptr(),
                a.as_ptr(),
                pos.as_ptr(),
                std::ptr::null_mut(),
                n_dims as i32,
                sys::GGML_ROPE_TYPE_NEOX as i32,
                0,
                theta,
                1.0,
                0.0,
                1.0,
                0.0,
                0.0,
            )
        };
        self.same_ctx("rope", raw)
    }

    /// Fused attention: q [d, n_q, H], k/v [d, n_kv, H_kv] (F16 or F32), mask F16
    /// [n_kv, n_q]. Result: [d, H, n_q].
    pub fn flash_attn_ext<'s>(
        &'s self,
        q: Tensor<'_>,
        k: Tensor<'_>,
        v: Tensor<'_>,
        mask: Option<Tensor<'_>>,
        scale: f32,
        softcap: f32,
    ) -> Result<Tensor<'s>> {
        let (qn, kn, vn) = (q.ne(), k.ne(), v.ne());
        if qn[0] != kn[0] || kn[1] != vn[1] || kn[2] != vn[2] || qn[2] % kn[2] != 0 {
            return Err(shape(
                "flash_attn_ext",
                format!("q {:?} k {:?} v {:?}", q.shape(), k.shape(), v.shape()),
            ));
        }
        if let Some(m) = mask {
            let mn = m.ne();
            if m.ty() != Type::F16 || mn[0] != kn[1] || mn[1] < qn[1] {
                return Err(shape(
                    "flash_attn_ext",
                    format!(
                        "mask {} {:?} for q {:?} k {:?}",
                        m.ty(),
                        m.shape(),
                        q.shape(),
                        k.shape()
                    ),
                ));
            }
        }
        self.room()?;
        let m = mask.map_or(std::ptr::null_mut(), |m| m.as_ptr());
        // SAFETY: shapes checked.
        let raw = unsafe {
            sys::ggml_flash_attn_ext(
                self.as_ptr(),
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                m,
                scale,
                0.0,
                softcap,
            )
        };
        let t = self.same_ctx("flash_attn_ext", raw)?;
        // SAFETY: valid attention node.
        unsafe { sys::ggml_prec_set_acc(t.as_ptr(), sys::GGML_PREC_F32) };
        Ok(t)
    }

    /// 2-D convolution by im2col + matmul. kernel [kw, kh, cin, cout], input
    /// [w, h, cin, n] -> [ow, oh, cout, n]. Unlike `ggml_conv_2d`, which always goes
    /// through an f16 im2col, an f32 kernel keeps the patches in f32.
    pub fn conv_2d<'s>(
        &'s self,
        kernel: Tensor<'_>,
        input: Tensor<'_>,
        stride: usize,
        pad: usize,
    ) -> Result<Tensor<'s>> {
        let (k, x) = (kernel.ne(), input.ne());
        if k[2] != x[2] || x[0] + 2 * pad < k[0] || x[1] + 2 * pad < k[1] || stride == 0 {
            return Err(shape(
                "conv_2d",
                format!("kernel {:?} on input {:?}", kernel.shape(), input.shape()),
            ));
        }
        self.room_for(2)?;
        let (s, p) = (stride as i32, pad as i32);
        let patch_ty = if kernel.ty() == Type::F16 {
            Type::F16
        } else {
            Type::F32
        };
        // SAFETY: shapes checked. Result [cin*kh*kw, ow, oh, n].
        let cols = self.same_ctx("im2col", unsafe {
            sys::ggml_im2col(
                self.as_ptr(),
                kernel.as_ptr(),
                input.as_ptr(),
                s,
                s,
                p,
                p,
                1,
                1,
                true,
                patch_ty.raw(),
            )
        })?;
        let c = cols.ne();
        let cols2 = self.reshape(cols, &[c[0], c[1] * c[2] * c[3]])?;
        let k2 = self.reshape(kernel, &[k[0] * k[1] * k[2], k[3]])?;
        let out = self.mul_mat(cols2, k2)?; // [ow*oh*n, cout]
        let out = self.reshape(out, &[c[1], c[2], c[3], k[3]])?; // [ow, oh, n, cout]
        self.cont(self.permute(out, [0, 1, 3, 2])?)
    }

    /// Where row `(i1, i2, i3)` of an allocated tensor starts (any strides): for our
    /// kernels (`packed`, `attention`), which read ggml's tensors as ggml hands them over.
    ///
    /// # Safety
    /// The indices are inside `t`, whose data is allocated.
    pub(crate) unsafe fn row_start(
        t: &sys::ggml_tensor,
        i1: usize,
        i2: usize,
        i3: usize,
    ) -> *const u8 {
        // SAFETY: as the caller promises.
        unsafe { (t.data as *const u8).add(i1 * t.nb[1] + i2 * t.nb[2] + i3 * t.nb[3]) }
    }

    /// A node computed by our own CPU kernel `fun` (`ggml_custom_4d`, run on all of the
    /// pool's threads) over `args`, with a result of type `ty` and shape `ne`; `userdata`
    /// is handed to `fun` as it is, never dereferenced by ggml.
    pub(crate) fn custom<'s>(
        &'s self,
        ty: Type,
        ne: [usize; 4],
        args: &[Tensor<'_>],
        fun: unsafe extern "C" fn(*mut sys::ggml_tensor, i32, i32, *mut std::ffi::c_void),
        userdata: usize,
    ) -> Result<Tensor<'s>> {
        if args.len() > MAX_CUSTOM_ARGS {
            return Err(shape(
                "custom",
                format!("{} arguments, at most {MAX_CUSTOM_ARGS}", args.len()),
            ));
        }
        self.room()?;
        let mut srcs: Vec<*mut sys::ggml_tensor> = args.iter().map(|t| t.as_ptr()).collect();
        // SAFETY: valid context and tensors, positive dimensions taken from them; the
        // callbacks (see `packed` and `attention`) read their sources and write their own
        // result, except the work counter the packed multiplication takes chunks from,
        // which lives in its quantized input.
        let raw = unsafe {
            sys::ggml_custom_4d(
                self.as_ptr(),
                ty.raw(),
                ne[0] as i64,
                ne[1] as i64,
                ne[2] as i64,
                ne[3] as i64,
                srcs.as_mut_ptr(),
                srcs.len() as i32,
                Some(fun),
                -1,
                userdata as *mut std::ffi::c_void,
            )
        };
        self.wrap("custom", raw)
    }

    pub(crate) fn room_for(&self, n: usize) -> Result<()> {
        // SAFETY: valid context.
        let free =
            unsafe { sys::ggml_get_mem_size(self.as_ptr()) - sys::ggml_used_mem(self.as_ptr()) };
        if free < n * unsafe { sys::ggml_tensor_overhead() } {
            return Err(Error::ContextFull(self.capacity));
        }
        Ok(())
    }

    /// Rows of `a` picked by the I32 indices in `ids`.
    pub fn get_rows<'s>(&'s self, a: Tensor<'_>, ids: Tensor<'_>) -> Result<Tensor<'s>> {
        if ids.ty() != Type::I32 || ids.ne()[2] != a.ne()[2] {
            return Err(shape(
                "get_rows",
                format!("{:?} by ids {:?}", a.shape(), ids.shape()),
            ));
        }
        self.room()?;
        // SAFETY: checked.
        self.same_ctx("get_rows", unsafe {
            sys::ggml_get_rows(self.as_ptr(), a.as_ptr(), ids.as_ptr())
        })
    }

    /// Writes the rows of `src` into `dst` at the I64 row indices `ids` (returns a view of dst).
    pub fn set_rows<'s>(
        &'s self,
        dst: Tensor<'_>,
        src: Tensor<'_>,
        ids: Tensor<'_>,
    ) -> Result<Tensor<'s>> {
        let (d, s) = (dst.ne(), src.ne());
        if !(ids.ty() == Type::I32 || ids.raw().type_ == sys::GGML_TYPE_I64)
            || d[0] != s[0]
            || ids.ne()[0] != s[1]
        {
            return Err(shape(
                "set_rows",
                format!(
                    "{:?} into {:?} by {:?}",
                    src.shape(),
                    dst.shape(),
                    ids.shape()
                ),
            ));
        }
        if dst.is_read_only() {
            return Err(Error::ReadOnly(dst.name()));
        }
        self.room()?;
        // SAFETY: checked.
        self.same_ctx("set_rows", unsafe {
            sys::ggml_set_rows(self.as_ptr(), dst.as_ptr(), src.as_ptr(), ids.as_ptr())
        })
    }

    /// Reshape of a contiguous tensor (ggml order).
    pub fn reshape<'s>(&'s self, a: Tensor<'_>, ne: &[usize]) -> Result<Tensor<'s>> {
        let n: usize = ne.iter().product();
        if !a.is_contiguous() || n != a.nelements() || ne.is_empty() || ne.len() > 4 {
            return Err(shape("reshape", format!("{:?} to {ne:?}", a.shape())));
        }
        self.room()?;
        let d: Vec<i64> = ne.iter().map(|&x| x as i64).collect();
        // SAFETY: element count and contiguity checked.
        let raw = unsafe {
            match d.len() {
                1 => sys::ggml_reshape_1d(self.as_ptr(), a.as_ptr(), d[0]),
                2 => sys::ggml_reshape_2d(self.as_ptr(), a.as_ptr(), d[0], d[1]),
                3 => sys::ggml_reshape_3d(self.as_ptr(), a.as_ptr(), d[0], d[1], d[2]),
                _ => sys::ggml_reshape_4d(self.as_ptr(), a.as_ptr(), d[0], d[1], d[2], d[3]),
            }
        };
        self.same_ctx("reshape", raw)
    }

    /// Permutes axes: axis i of `a` becomes axis `axes[i]` of the result.
    pub fn permute<'s>(&'s self, a: Tensor<'_>, axes: [usize; 4]) -> Result<Tensor<'s>> {
        let mut sorted = axes;
        sorted.sort();
        if sorted != [0, 1, 2, 3] {
            return Err(shape("permute", format!("{axes:?} is not a permutation")));
        }
        self.room()?;
        let [a0, a1, a2, a3] = axes.map(|x| x as i32);
        // SAFETY: valid permutation.
        self.same_ctx("permute", unsafe {
            sys::ggml_permute(self.as_ptr(), a.as_ptr(), a0, a1, a2, a3)
        })
    }

    pub fn transpose<'s>(&'s self, a: Tensor<'_>) -> Result<Tensor<'s>> {
        self.room()?;
        // SAFETY: any tensor.
        self.same_ctx("transpose", unsafe {
            sys::ggml_transpose(self.as_ptr(), a.as_ptr())
        })
    }

    /// Makes a contiguous copy.
    pub fn cont<'s>(&'s self, a: Tensor<'_>) -> Result<Tensor<'s>> {
        self.room()?;
        // SAFETY: any tensor.
        self.same_ctx("cont", unsafe { sys::ggml_cont(self.as_ptr(), a.as_ptr()) })
    }

    /// Converts to another type (F32/F16/BF16 and quantized destinations ggml supports).
    pub fn cast<'s>(&'s self, a: Tensor<'_>, ty: Type) -> Result<Tensor<'s>> {
        self.room_for(2)?;
        // SAFETY: any tensor.
        self.same_ctx("cast", unsafe {
            sys::ggml_cast(self.as_ptr(), a.as_ptr(), ty.raw())
        })
    }

    /// A strided view: shape `ne`, byte strides `nb[1..]`, starting `offset` bytes in.
    pub fn view<'s>(
        &'s self,
        a: Tensor<'_>,
        ne: &[usize],
        nb: &[usize],
        offset: usize,
    ) -> Result<Tensor<'s>> {
        if ne.is_empty() || ne.len() > 4 || nb.len() + 1 != ne.len() {
            return Err(shape("view", format!("shape {ne:?} with strides {nb:?}")));
        }
        let ty = a.ty();
        let mut last = offset + ty.row_size(ne[0])?;
        for (d, s) in ne[1..].iter().zip(nb) {
            last += (d - 1) * s;
        }
        if last > a.nbytes() {
            return Err(shape(
                "view",
                format!(
                    "view {ne:?}/{nb:?}+{offset} runs past {:?} ({} bytes)",
                    a.shape(),
                    a.nbytes()
                ),
            ));
        }
        self.room()?;
        let d: Vec<i64> = ne.iter().map(|&x| x as i64).collect();
        // SAFETY: bounds checked against the source's bytes.
        let raw = unsafe {
            match d.len() {
                1 => sys::ggml_view_1d(self.as_ptr(), a.as_ptr(), d[0], offset),
                2 => sys::ggml_view_2d(self.as_ptr(), a.as_ptr(), d[0], d[1], nb[0], offset),
                3 => sys::ggml_view_3d(
                    self.as_ptr(),
                    a.as_ptr(),
                    d[0],
                    d[1],
                    d[2],
                    nb[0],
                    nb[1],
                    offset,
                ),
                _ => sys::ggml_view_4d(
                    self.as_ptr(),
                    a.as_ptr(),
                    d[0],
                    d[1],
                    d[2],
                    d[3],
                    nb[0],
                    nb[1],
                    nb[2],
                    offset,
                ),
            }
        };
        self.same_ctx("view", raw)
    }

    /// Concatenates along dimension `dim`.
    pub fn concat<'s>(&'s self, a: Tensor<'_>, b: Tensor<'_>, dim: usize) -> Result<Tensor<'s>> {
        let (x, y) = (a.ne(), b.ne());
        if dim > 3 || (0..4).any(|i| i != dim && x[i] != y[i]) || a.ty() != b.ty() {
            return Err(shape(
                "concat",
                format!("{:?} and {:?} along {dim}", a.shape(), b.shape()),
            ));
        }
        self.room()?;
        // SAFETY: checked.
        self.same_ctx("concat", unsafe {
            sys::ggml_concat(self.as_ptr(), a.as_ptr(), b.as_ptr(), dim as i32)
        })
    }

    /// Appends `pad[i]` zeros at the end of dimension i.
    pub fn pad<'s>(&'s self, a: Tensor<'_>, pad: [usize; 4]) -> Result<Tensor<'s>> {
        if pad.iter().any(|&p| p > i32::MAX as usize) || a.ty() != Type::F32 {
            return Err(shape(
                "pad",
                format!("{:?} {} by {pad:?}", a.shape(), a.ty()),
            ));
        }
        self.room()?;
        let [p0, p1, p2, p3] = pad.map(|p| p as i32);
        // SAFETY: f32 tensor, non-negative pads.
        self.same_ctx("pad", unsafe {
            sys::ggml_pad(self.as_ptr(), a.as_ptr(), p0, p1, p2, p3)
        })
    }
}
