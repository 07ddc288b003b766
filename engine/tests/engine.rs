//! The engine on the real default model: llama.cpp agreement, batching and
//! preemption invariance, prefix reuse with events, KV export/import,
//! cancellation and bad input.

use serde_json::Value;
use tandem_engine::device::Device;
use tandem_engine::engine::{
    Engine, EngineConfig, EngineError, FinishReason, Generation, KvReservation, KvStream, Request,
    TokenEvent,
};
use tandem_engine::paths;
use tandem_protocol::{BlockHasher, KvEventKind};

/// Every test here runs on `$TANDEM_TEST_DEVICE` (default `cpu`), so a GPU
/// machine runs the same suite on the CUDA backend (`scripts/gpu-check`).
fn engine(config: EngineConfig) -> Engine {
    let device = std::env::var("TANDEM_TEST_DEVICE").map_or(Device::Cpu, |d| {
        d.parse()
            .expect("TANDEM_TEST_DEVICE is cpu, cuda or cuda:N")
    });
    Engine::load(paths::test_model_path(), EngineConfig { device, ..config })
        .expect("load the default model")
}

fn small() -> EngineConfig {
    EngineConfig {
        kv_cache_tokens: 4096,
        ..EngineConfig::default()
    }
}

fn reference() -> Value {
    serde_json::from_str(paths::reference_json()).expect("reference JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn greedy(engine: &Engine, prompt: &[u32], n: usize) -> Generation {
    let mut r = Request::new(prompt.to_vec(), n);
    r.sampling.logprobs = 3;
    engine
        .submit(r)
        .expect("submit")
        .wait()
        .expect("generation")
}

fn output_ids(g: &Generation) -> Vec<u32> {
    g.tokens.iter().map(|t| t.id).collect()
}

/// Each prompt's `n` greedy tokens, generated one prompt at a time.
fn one_at_a_time(e: &Engine, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| output_ids(&greedy(e, p, n)))
        .collect()
}

/// Each prompt's `n` greedy tokens, all prompts submitted before any finishes.
fn all_at_once(e: &Engine, prompts: &[Vec<u32>], n: usize) -> Vec<Vec<u32>> {
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(Request::new(p.clone(), n)).expect("submit"))
        .collect();
    handles
        .into_iter()
        .map(|h| output_ids(&h.wait().expect("generation")))
        .collect()
}

/// Greedy output follows llama.cpp's: identical tokens up to a point where
/// llama.cpp's own top-2 are within 0.1 (a near tie), and the chosen token's
/// log-probability close to llama.cpp's wherever both chose the same token:
/// within 0.05 on average, and within 0.15 at every step (one step of one
/// case differs by 0.13: Q8 activation rounding flips there; see
/// docs/benchmarks.md).
#[test]
fn greedy_follows_llamacpp_reference() {
    let engine = engine(small());
    let reference = reference();
    for chat in reference["chat"].as_array().expect("chat cases") {
        let prompt = ids(&chat["prompt_ids"]);
        let expected = ids(&chat["completion_ids"]);
        let ref_lp: Vec<f64> = chat["chosen_logprobs"]
            .as_array()
            .expect("logprobs")
            .iter()
            .map(|v| v.as_f64().expect("logprob"))
            .collect();
        let top3 = chat["top3"].as_array().expect("top3");
        let g = greedy(&engine, &prompt, expected.len());
        let got = output_ids(&g);
        let mut compared = 0;
        let mut total_diff = 0.0;
        for (i, &want) in expected.iter().enumerate() {
            let alts = top3[i].as_array().expect("alternatives");
            let lp = |k: usize| alts[k][2].as_f64().expect("alt logprob");
            let near_tie = alts.len() > 1 && lp(0) - lp(1) < 0.1;
            let Some(&ours) = got.get(i) else {
                panic!(
                    "{:?}: stopped after {i} tokens, llama.cpp went on",
                    chat["user"]
                );
            };
            if ours != want {
                assert!(
                    near_tie,
                    "{:?}: token {i} is {ours}, llama.cpp chose {want} with no near tie (top3 {:?}); ours {got:?}",
                    chat["user"], alts
                );
                break;
            }
            let diff = (g.tokens[i].logprob as f64 - ref_lp[i]).abs();
            total_diff += diff;
            assert!(
                diff < 0.15,
                "{:?}: token {i} logprob {} vs llama.cpp {}",
                chat["user"],
                g.tokens[i].logprob,
                ref_lp[i]
            );
            compared += 1;
        }
        assert!(
            compared >= 7,
            "{:?}: only {compared} tokens agreed",
            chat["user"]
        );
        let mean = total_diff / compared as f64;
        assert!(
            mean < 0.05,
            "{:?}: mean logprob difference {mean}",
            chat["user"]
        );
    }
}

fn chat_prompts() -> Vec<Vec<u32>> {
    reference()["chat"]
        .as_array()
        .expect("chat cases")
        .iter()
        .map(|c| ids(&c["prompt_ids"]))
        .collect()
}

/// The same prompts alone and together, with prefill chunked across steps, give the same tokens.
#[test]
fn batching_does_not_change_greedy_output() {
    let prompts = chat_prompts();
    let alone = one_at_a_time(&engine(small()), &prompts, 24);
    let e = engine(EngineConfig {
        max_batch_tokens: 20,
        ..small()
    });
    let together = all_at_once(&e, &prompts, 24);
    assert_eq!(alone, together);
}

/// A cache too small for every sequence at once forces preemption; outputs stay the same.
#[test]
fn preemption_does_not_change_greedy_output() {
    let prompts = chat_prompts();
    let alone = one_at_a_time(&engine(small()), &prompts, 40);
    // Each sequence needs 5-6 blocks of 16 by its end; 10 blocks cannot hold three.
    let e = engine(EngineConfig {
        kv_cache_tokens: 160,
        ..EngineConfig::default()
    });
    let together = all_at_once(&e, &prompts, 40);
    assert_eq!(alone, together);
}

/// A second request sharing a prefix reuses its blocks, reports them as cached,
/// gets the same output as a cold engine, and the engine's events name the blocks.
#[test]
fn prefix_reuse_and_events() {
    let prompts = chat_prompts();
    let first = &prompts[0];
    let e = engine(small());
    let mut events = e.subscribe_kv_events();
    let g1 = greedy(&e, first, 4);
    assert_eq!(g1.usage.cached_tokens, 0);

    let mut longer = first.clone();
    longer.extend_from_slice(&prompts[1][..10]);
    let g2 = greedy(&e, &longer, 8);
    let bs = e.kv_layout().block_size;
    assert_eq!(g2.usage.cached_tokens, first.len() / bs * bs);
    assert!(e.load_report().kv_hit_rate > 0.0);

    let cold = engine(small());
    assert_eq!(output_ids(&greedy(&cold, &longer, 8)), output_ids(&g2));

    let hasher = BlockHasher::new(&e.model_config().name, bs);
    let expected = hasher.hash_prefix(&longer);
    let mut stored = Vec::new();
    let mut last_seq = None;
    while let Ok(ev) = events.try_recv() {
        if let Some(prev) = last_seq {
            assert_eq!(ev.seq, prev + 1, "event numbers are consecutive");
        }
        last_seq = Some(ev.seq);
        if let KvEventKind::Stored { hashes, .. } = ev.kind {
            stored.extend(hashes);
        }
    }
    for h in &expected {
        assert!(
            stored.contains(h),
            "block {h:?} of the prompt was announced"
        );
    }
}

/// KV exported after a prefill on one engine and imported into another
/// continues exactly as if the first engine had gone on decoding.
#[test]
fn exported_kv_decodes_identically_elsewhere() {
    let prompt = chat_prompts().remove(2);
    let a = engine(small());
    let whole = output_ids(&greedy(&a, &prompt, 12));

    let mut r = Request::new(prompt.clone(), 1);
    r.retain_kv = true;
    let h = a.submit(r).expect("submit");
    let id = h.id;
    let first = output_ids(&h.wait().expect("prefill"));
    let kv = a.export_kv(id).expect("export");
    assert_eq!(kv.tokens, prompt);
    assert!(matches!(
        a.export_kv(id),
        Err(EngineError::UnknownRequest(_))
    ));

    let b = engine(small());
    let mut cont = prompt.clone();
    cont.push(first[0]);
    let mut r = Request::new(cont, 11);
    r.imported_kv = Some(kv.clone());
    let rest = output_ids(&b.submit(r).expect("submit").wait().expect("decode"));
    assert_eq!([first, rest].concat(), whole);

    // A corrupted import is refused before it can be used.
    let mut bad = kv;
    bad.data.truncate(10);
    let mut r = Request::new([prompt, vec![1]].concat(), 1);
    r.imported_kv = Some(bad);
    assert!(matches!(b.submit(r), Err(EngineError::KvMismatch(_))));
}

#[test]
fn cancellation_stops_one_request_and_others_go_on() {
    let prompts = chat_prompts();
    let e = engine(small());
    let mut long = Request::new(prompts[0].clone(), 500);
    long.ignore_eos = true;
    let mut h = e.submit(long).expect("submit");
    let other = e
        .submit(Request::new(prompts[1].clone(), 8))
        .expect("submit");
    let mut seen = 0;
    while seen < 2 {
        if let Some(TokenEvent::Token(_)) = h.events.blocking_recv() {
            seen += 1;
        }
    }
    e.cancel(h.id);
    let mut reason = None;
    while let Some(ev) = h.events.blocking_recv() {
        if let TokenEvent::Finished { reason: r, usage } = ev {
            assert!(usage.completion_tokens < 500);
            reason = Some(r);
        }
    }
    assert_eq!(reason, Some(FinishReason::Cancelled));
    let g = other.wait().expect("the other request finishes");
    assert!(!g.tokens.is_empty());
    // The load report is published after each step; give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while e.load_report().running != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(e.load_report().running, 0);
}

#[test]
fn bad_requests_are_refused_with_reasons() {
    let e = engine(small());
    assert!(matches!(
        e.submit(Request::new(vec![], 4)),
        Err(EngineError::EmptyPrompt)
    ));
    let huge = vec![1u32; 5000];
    assert!(matches!(
        e.submit(Request::new(huge, 4)),
        Err(EngineError::PromptTooLong { .. })
    ));
    let err = e.submit(Request::new(vec![1, 999_999], 4)).unwrap_err();
    assert!(err.to_string().contains("999999"), "{err}");
    let mut r = Request::new(vec![1, 2, 3], 4);
    r.sampling.temperature = -1.0;
    assert!(matches!(e.submit(r), Err(EngineError::Sampling(_))));
    // The engine still serves.
    assert_eq!(greedy(&e, &[1, 2, 3], 2).tokens.len(), 2);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let prompt = chat_prompts().remove(0);
    let e = engine(small());
    let run = |seed| {
        let mut r = Request::new(prompt.clone(), 16);
        r.sampling.temperature = 1.0;
        r.sampling.seed = Some(seed);
        r.ignore_eos = true;
        output_ids(&e.submit(r).expect("submit").wait().expect("generation"))
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
}

#[test]
fn stop_strings_end_generation_and_are_not_returned() {
    let prompt = chat_prompts().remove(0);
    let e = engine(small());
    let free = greedy(&e, &prompt, 24);
    // Stop on a piece of text the model will produce after its first few tokens.
    let cut = free
        .text
        .char_indices()
        .nth(6)
        .map(|(i, _)| i)
        .expect("enough text");
    let stop: String = free.text[cut..].chars().take(3).collect();
    let mut r = Request::new(prompt, 24);
    r.stop = vec![stop.clone()];
    let g = e.submit(r).expect("submit").wait().expect("generation");
    assert_eq!(g.reason, FinishReason::Stop);
    assert!(!g.text.contains(&stop));
    assert!(free.text.starts_with(&g.text));
}

/// Drives a future that needs no I/O to completion on this thread.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// Waits until the engine's published load shows `used` blocks in use.
fn wait_blocks_used(e: &Engine, used: usize) {
    let start = std::time::Instant::now();
    while e.load_report().kv_blocks_used != used {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "blocks in use stay at {}, expected {used}",
            e.load_report().kv_blocks_used
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The transfer hooks: a prefill streams its KV chunk by chunk as steps
/// complete blocks; another engine reserves blocks (reusing its cached
/// prefix), takes the pieces, refuses an incomplete reservation, frees
/// aborted ones, and decodes from a complete one exactly as the first
/// engine did.
#[test]
fn streamed_kv_into_reserved_blocks_decodes_identically() {
    let prompt: Vec<u32> = chat_prompts().concat();
    let config = EngineConfig {
        max_batch_tokens: 32,
        ..small()
    };
    let a = engine(config.clone());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut r = Request::new(prompt.clone(), 8);
    r.kv_stream = Some(KvStream { skip_blocks: 2, tx });
    let whole = output_ids(&a.submit(r).expect("submit").wait().expect("generation"));
    let mut chunks = Vec::new();
    while let Ok(c) = rx.try_recv() {
        chunks.push(c);
    }
    let layout = a.kv_layout();
    let n_blocks = prompt.len().div_ceil(layout.block_size);
    assert!(
        chunks.len() > layout.n_layers,
        "a chunked prefill streams as it goes"
    );
    // Per step, every layer of the step's new blocks, in layer order.
    let mut next = 2;
    for step in chunks.chunks(layout.n_layers) {
        for (l, c) in step.iter().enumerate() {
            assert_eq!(c.first_block, next, "blocks stream in order, once");
            assert_eq!((c.layer, c.n_blocks), (l, step[0].n_blocks));
            assert_eq!(c.data.len(), c.n_blocks * layout.piece_bytes());
        }
        next += step[0].n_blocks;
    }
    assert_eq!(next, n_blocks);

    let b = engine(config);
    // The first two blocks are cached on the receiver already.
    let warm = b
        .submit(Request::new(
            prompt[..2 * layout.block_size + 1].to_vec(),
            1,
        ))
        .expect("submit");
    warm.wait().expect("warm-up");
    wait_blocks_used(&b, 0);

    let write_all = |res: &KvReservation, skip_last_layer: bool| {
        for c in &chunks {
            if skip_last_layer && c.layer + 1 == layout.n_layers {
                continue;
            }
            block_on(res.write(c.layer, c.first_block, c.data.clone())).expect("write");
        }
    };
    let cont = [prompt.clone(), vec![whole[0]]].concat();

    let res = b.reserve_kv(prompt.clone()).expect("reserve");
    assert_eq!((res.blocks.len(), res.cached_blocks), (n_blocks, 2));
    assert!(
        res.check_write(0, 1, layout.piece_bytes()).is_err(),
        "cached blocks are not writable"
    );
    write_all(&res, true);
    assert!(matches!(
        b.submit_reserved(res, Request::new(cont.clone(), 7)),
        Err(EngineError::IncompleteReservation { missing, .. }) if missing == n_blocks - 2
    ));
    wait_blocks_used(&b, 0);

    let res = b.reserve_kv(prompt.clone()).expect("reserve");
    wait_blocks_used(&b, n_blocks);
    drop(res);
    wait_blocks_used(&b, 0);

    let res = b.reserve_kv(prompt.clone()).expect("reserve");
    write_all(&res, false);
    let h = b
        .submit_reserved(res, Request::new(cont, 7))
        .expect("submit reserved");
    let g = h.wait().expect("decode");
    assert_eq!(g.usage.cached_tokens, 2 * layout.block_size);
    assert_eq!(output_ids(&g), whole[1..]);
}
