//! Long-lived tensors (weights, a KV cache) held by handle.
//!
//! A [`Tensor`] borrows its [`Context`], so a model cannot keep typed structs of
//! tensors beside the contexts that own them. A [`TensorStore`] owns the contexts and
//! hands out [`TensorRef`]s: plain copyable handles that typed weight structs keep,
//! turned back into tensors with [`TensorStore::get`] while building a graph, with no
//! lookup by name and no allocation.
use crate::error::shape;
use crate::sys;
use crate::{Context, Result, Tensor};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tells stores apart, so that a handle is only ever resolved by the store it came from.
static NEXT_STORE: AtomicU64 = AtomicU64::new(1);

/// Owner of the contexts of long-lived tensors. Not for threads to share (its tensors
/// can be written); [`TensorStore::share`] makes one that is:
///
/// ```compile_fail
/// fn shared<T: Sync>() {}
/// shared::<ggml::TensorStore>();
/// ```
pub struct TensorStore {
    id: u64,
    contexts: Vec<Context>,
}

/// A tensor of a [`TensorStore`], resolved with [`TensorStore::get`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TensorRef {
    store: u64,
    ptr: NonNull<sys::ggml_tensor>,
}

// SAFETY: a handle is an address that is only dereferenced through the store that
// owns the tensor (checked by id), under that store's borrow.
unsafe impl Send for TensorRef {}
unsafe impl Sync for TensorRef {}

/// A [`TensorStore`] made final to be shared between threads (a model's weights, see
/// `paligemma::Model::fork`): [`TensorStore::share`] checks every tensor and marks it
/// read-only, after which writing one (its data, name or output flag, or rows through
/// `Context::set_rows`, directly or through a view) is refused.
pub struct SharedStore(TensorStore);

// SAFETY: threads only read a shared store's tensors. `share` admits only named,
// allocated tensors that are no op's result (`GGML_OP_NONE`): ggml, building graphs on
// them, writes the name of a leaf that has none and the compute flag of a tensor that
// is an op (`ggml_visit_parents_graph`), and the allocator places tensors that have no
// data; the scheduler rewrites the sources of op nodes. None of that touches such a
// tensor, and it is never computed. Our safe API refuses every other write (see
// `Tensor::is_read_only`): data (`write_bytes`, `Context::set_rows`, `Buffer::place`,
// also through views), name and flags (`set_name`, `set_output` panic).
unsafe impl Sync for SharedStore {}

impl Default for TensorStore {
    fn default() -> Self {
        TensorStore {
            id: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
            contexts: Vec::new(),
        }
    }
}

impl TensorStore {
    pub fn new() -> TensorStore {
        TensorStore::default()
    }

    /// Takes ownership of a context (whose tensors are typically placed in a buffer
    /// already) and returns handles to its tensors in creation order.
    pub fn insert(&mut self, ctx: Context) -> Vec<TensorRef> {
        let refs = ctx
            .tensors()
            .map(|t| TensorRef {
                store: self.id,
                ptr: t.ptr,
            })
            .collect();
        self.contexts.push(ctx);
        refs
    }

    /// Marks every tensor read-only, for threads to share. Each must be named, have its
    /// data in a buffer and be no op's result (see `SharedStore`'s safety note).
    pub fn share(self) -> Result<SharedStore> {
        // A store refused is dropped with whatever was marked.
        for t in self.contexts.iter().flat_map(|ctx| ctx.tensors()) {
            if t.name().is_empty() || !t.is_allocated() || t.is_op() {
                return Err(shape(
                    "share",
                    format!(
                        "tensor {:?} (unnamed, unallocated or an op's result)",
                        t.name()
                    ),
                ));
            }
            t.mark_read_only();
        }
        Ok(SharedStore(self))
    }

    /// The tensor behind a handle of this store.
    ///
    /// # Panics
    /// When the handle comes from another store: a programming error, never a
    /// consequence of input.
    pub fn get(&self, r: TensorRef) -> Tensor<'_> {
        assert_eq!(
            r.store, self.id,
            "a tensor handle resolved by a store it does not belong to"
        );
        // The tensor's metadata lives in one of `self.contexts`, which live as long as
        // `self`: the returned borrow keeps the store (and so the context) alive.
        Tensor {
            ptr: r.ptr,
            _ctx: PhantomData,
        }
    }
}

impl SharedStore {
    /// The tensor behind a handle of this store (read-only).
    ///
    /// # Panics
    /// When the handle comes from another store (see [`TensorStore::get`]).
    pub fn get(&self, r: TensorRef) -> Tensor<'_> {
        self.0.get(r)
    }
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shared{:?}", self.0)
    }
}

impl std::fmt::Debug for TensorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorStore({} contexts)", self.contexts.len())
    }
}

impl std::fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TensorRef({:p})", self.ptr)
    }
}
