//! Long-lived tensors (weights, a KV cache) held by handle.
//!
//! A [`Tensor`] borrows its [`Context`], so a model cannot keep typed structs of
//! tensors beside the contexts that own them. A [`TensorStore`] owns the contexts and
//! hands out [`TensorRef`]s: plain copyable handles that typed weight structs keep,
//! turned back into tensors with [`TensorStore::get`] while building a graph, with no
//! lookup by name and no allocation.
use crate::sys;
use crate::{Context, Tensor};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Tells stores apart, so that a handle is only ever resolved by the store it came from.
static NEXT_STORE: AtomicU64 = AtomicU64::new(1);

/// Owner of the contexts of long-lived tensors.
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

// SAFETY: a shared store only hands out its tensors to build graphs on: ggml reads a
// source tensor's fields when it builds an op on it and its data when it computes, and
// writes only the name of a leaf that has none (`ggml_visit_parents`), which a tensor
// made with `Context::new_named` always has. This rests on a contract the types do not
// enforce: a store shared between threads (a model's weights, see `paligemma::Model::fork`)
// has its tensors named and written before it is shared, and `Tensor`'s setters are not
// called on them after.
unsafe impl Sync for TensorStore {}

impl Default for TensorStore {
    fn default() -> Self {
        TensorStore { id: NEXT_STORE.fetch_add(1, Ordering::Relaxed), contexts: Vec::new() }
    }
}

impl TensorStore {
    pub fn new() -> TensorStore {
        TensorStore::default()
    }

    /// Takes ownership of a context (whose tensors are typically placed in a buffer
    /// already) and returns handles to its tensors in creation order.
    pub fn insert(&mut self, ctx: Context) -> Vec<TensorRef> {
        let refs = ctx.tensors().map(|t| TensorRef { store: self.id, ptr: t.ptr }).collect();
        self.contexts.push(ctx);
        refs
    }

    /// The tensor behind a handle of this store.
    ///
    /// # Panics
    /// When the handle comes from another store: a programming error, never a
    /// consequence of input.
    pub fn get(&self, r: TensorRef) -> Tensor<'_> {
        assert_eq!(r.store, self.id, "a tensor handle resolved by a store it does not belong to");
        // The tensor's metadata lives in one of `self.contexts`, which live as long as
        // `self`: the returned borrow keeps the store (and so the context) alive.
        Tensor { ptr: r.ptr, _ctx: PhantomData }
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
