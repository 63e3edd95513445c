//! `TensorStore::share`: the tensors of a shared store are read by graphs on any
//! thread, and every write to them is refused.
use ggml::{Backend, Context, Error, Scheduler, SharedStore, TensorStore, Type};

fn store() -> (SharedStore, ggml::TensorRef, ggml::Buffer) {
    let backend = Backend::cpu().unwrap();
    let ctx = Context::new(8, 0).unwrap();
    ctx.new_named("w", Type::F32, &[4, 2]).unwrap();
    let buffer = backend.alloc_tensors(&ctx).unwrap();
    let mut store = TensorStore::new();
    let w = store.insert(ctx)[0];
    store
        .get(w)
        .write_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
        .unwrap();
    (store.share().unwrap(), w, buffer)
}

#[test]
fn only_named_allocated_leaves_are_shared() {
    // ggml writes the flags of op results and places unallocated tensors while building
    // graphs on them: neither may be shared.
    let backend = Backend::cpu().unwrap();
    let ctx = Context::new(8, 0).unwrap();
    let w = ctx.new_named("w", Type::F32, &[4]).unwrap();
    ctx.scale(w, 2.0).unwrap();
    let _buffer = backend.alloc_tensors(&ctx).unwrap();
    let mut with_op = TensorStore::new();
    with_op.insert(ctx);
    assert!(with_op.share().is_err());
    let ctx = Context::new(8, 0).unwrap();
    ctx.new_named("w", Type::F32, &[4]).unwrap();
    let mut unallocated = TensorStore::new();
    unallocated.insert(ctx);
    assert!(unallocated.share().is_err());
}

#[test]
fn a_shared_store_refuses_every_write() {
    let (shared, w, _buffer) = store();
    let w = shared.get(w);
    assert!(w.is_read_only());
    assert!(matches!(w.write_f32(&[0.0; 8]), Err(Error::ReadOnly(_))));
    let g = Context::new(16, 16).unwrap();
    let row = g.view(w, &[4], &[], 16).unwrap();
    assert!(row.is_read_only(), "a view of a shared tensor");
    assert!(matches!(row.write_f32(&[0.0; 4]), Err(Error::ReadOnly(_))));
    let src = g.input("src", Type::F32, &[4, 1]).unwrap();
    let ids = g.input("ids", Type::I32, &[1]).unwrap();
    assert!(matches!(g.set_rows(w, src, ids), Err(Error::ReadOnly(_))));
    let panics =
        |write: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(write)).is_err();
    assert!(panics(&|| w.set_name("x")));
    assert!(panics(&|| w.set_output()));
    assert_eq!(w.name(), "w");
    assert_eq!(
        w.read_f32().unwrap(),
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    );
}

#[test]
fn graphs_on_other_threads_read_a_shared_store() {
    let (shared, w, _buffer) = store();
    std::thread::scope(|scope| {
        for factor in [2.0f32, 3.0] {
            let shared = &shared;
            scope.spawn(move || {
                let ctx = Context::new(8, 16).unwrap();
                let out = ctx.scale(shared.get(w), factor).unwrap();
                out.set_output();
                let mut graph = ctx.graph(16).unwrap();
                graph.expand(out).unwrap();
                let mut sched = Scheduler::new(Backend::cpu().unwrap(), 1, 16).unwrap();
                sched.alloc(&graph).unwrap();
                sched.compute(&graph).unwrap();
                let want: Vec<f32> = (1..=8).map(|x| x as f32 * factor).collect();
                assert_eq!(out.read_f32().unwrap(), want);
            });
        }
    });
}
