use super::*;
use crate::cpu::dequantize_row;
use crate::engine::{Engine, EngineConfig, Request};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-synth-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("test setup");
    dir
}

fn opts(quant: Quant, seed: u64, out: PathBuf) -> SynthOptions {
    SynthOptions {
        shape: Shape::Tiny,
        quant,
        seed,
        tokenizer_from: crate::paths::test_model_path(),
        out,
        force: false,
    }
}

#[test]
fn quantizers_round_trip_through_the_engines_dequantization() {
    let cols = 4096;
    let mut x = vec![0f32; cols];
    for (row, std) in [(0u64, 1.0f32), (1, 0.02), (2, 30.0)] {
        fill_random(7, 1, row, std, &mut x);
        // A constant block and a block of zeros must survive too.
        x[..32].fill(0.0);
        x[32..64].fill(0.5 * std);
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q8_0,
        ] {
            let mut q = vec![0u8; ty.row_bytes(cols).expect("test setup")];
            quantize_row(ty, &x, &mut q);
            let mut back = vec![0f32; cols];
            dequantize_row(ty, &q, &mut back);
            for (bi, (b, o)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let range = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
                    - b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                // Half a quantization step, plus f16 rounding of the scales.
                let tol = match ty {
                    GgmlType::F32 => 0.0,
                    GgmlType::F16 => amax / 2048.0,
                    GgmlType::BF16 => amax / 256.0,
                    // ggml's Q4_0 maps -amax to -8: +amax clips to 7 steps.
                    GgmlType::Q4_0 => amax / 8.0 + amax * 2e-3,
                    GgmlType::Q4_1 => range / 15.0 * 0.5 + amax * 2e-3,
                    GgmlType::Q8_0 => amax / 127.0 * 0.5 + amax * 2e-3,
                };
                for (j, (a, c)) in b.iter().zip(o).enumerate() {
                    assert!(
                        (a - c).abs() <= tol,
                        "{} row {row} block {bi} elem {j}: {a} came back as {c} (tol {tol})",
                        ty.name()
                    );
                }
            }
        }
    }
}

#[test]
fn random_weights_have_the_asked_spread() {
    let mut x = vec![0f32; 1 << 16];
    fill_random(3, 9, 0, 0.25, &mut x);
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let std = (x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
    assert!(mean.abs() < 0.01, "mean {mean}");
    assert!((std - 0.25).abs() < 0.01, "std {std}");
    let mut y = vec![0f32; 1 << 16];
    fill_random(3, 9, 1, 0.25, &mut y);
    assert_ne!(x, y, "rows must differ");
}

#[test]
fn names_and_paths_are_checked() {
    assert!(matches!(
        "llama-2b".parse::<Shape>(),
        Err(SynthError::UnknownShape(_))
    ));
    assert!(matches!(
        "q5_k".parse::<Quant>(),
        Err(SynthError::UnknownQuant(_))
    ));
    assert_eq!("Q4_1".parse::<Quant>().expect("test setup"), Quant::Q4_1);
    let dir = temp_dir("paths");
    let err = synthesize(&opts(Quant::Q8_0, 0, dir.join("no/such/dir/x.gguf")))
        .expect_err("missing directory");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let existing = dir.join("exists.gguf");
    std::fs::write(&existing, b"x").expect("test setup");
    let err = synthesize(&opts(Quant::Q8_0, 0, existing.clone())).expect_err("exists");
    assert!(matches!(err, SynthError::Exists(_)), "{err}");
    assert_eq!(std::fs::read(&existing).expect("test setup"), b"x");
    // A bad tokenizer source fails before anything is written.
    let mut o = opts(Quant::Q8_0, 0, dir.join("bad-src.gguf"));
    o.tokenizer_from = existing.clone();
    let err = synthesize(&o).expect_err("bad source");
    assert!(matches!(err, SynthError::TokenizerSource { .. }), "{err}");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("test setup")
        .map(|e| e.expect("test setup").file_name())
        .collect();
    assert_eq!(
        left.len(),
        1,
        "only the pre-existing file may remain: {left:?}"
    );
    std::fs::remove_dir_all(&dir).expect("test setup");
}

fn greedy(path: &Path, prompt: &[u32]) -> Vec<u32> {
    let engine = Engine::load(
        path,
        EngineConfig {
            kv_cache_tokens: 512,
            threads: Some(2),
            ..EngineConfig::default()
        },
    )
    .expect("synthetic model loads");
    let mut req = Request::new(prompt.to_vec(), 6);
    req.ignore_eos = true;
    let g = engine
        .submit(req)
        .expect("test setup")
        .wait()
        .expect("generation");
    g.tokens.iter().map(|t| t.id).collect()
}

#[test]
fn tiny_loads_tokenizes_and_generates_in_every_quant() {
    let dir = temp_dir("tiny");
    let p = Shape::Tiny.params();
    for quant in [Quant::Q4_1, Quant::Q8_0, Quant::F16] {
        let tag = quant.ggml_type().name();
        let a = dir.join(format!("a-{tag}.gguf"));
        let report = synthesize(&opts(quant, 1, a.clone())).expect("synthesize");
        assert_eq!(
            report.file_bytes,
            std::fs::metadata(&a).expect("written").len()
        );

        // The file reads back with the shape's metadata and tensor types.
        let f = GgufFile::open(&a).expect("reads back");
        assert_eq!(f.version(), 3);
        assert!(
            f.get_str("general.name")
                .expect("name")
                .contains("synthetic")
        );
        let embd = f.tensor("token_embd.weight").expect("embedding");
        assert_eq!(embd.dims, vec![p.d_model as u64, p.vocab_size as u64]);
        assert_eq!(embd.ty, quant.ggml_type());
        assert_eq!(
            f.tensor("blk.1.attn_norm.weight").expect("norm").ty,
            GgmlType::F32
        );
        assert_eq!(
            f.tensor("output.weight").expect("output").ty,
            quant.ggml_type()
        );
        assert_eq!(f.tensors().len(), 2 * 9 + 3);

        let engine = Engine::load(&a, EngineConfig::default()).expect("engine loads it");
        let c = engine.model_config();
        assert_eq!(
            (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim),
            (2, 128, 4, 2, 32)
        );
        assert_eq!(
            (c.ffn_dim, c.vocab_size, c.context_length),
            (256, 49_216, 2048)
        );
        assert_eq!(c.rope_base, 10_000.0);
        let tok = engine.tokenizer();
        assert_eq!(tok.vocab_size(), p.vocab_size);
        let text = "Hello, synthetic world! 123 <|im_start|>";
        let ids = tok.encode(text, true);
        assert!(ids.len() > 3, "{ids:?}");
        assert!(
            ids.iter().all(|&i| i < 49_152),
            "padding never tokenized: {ids:?}"
        );
        assert_eq!(tok.decode(&ids), text);
        assert!(engine.chat_template().is_some(), "chat template copied");
        drop(engine);

        // Greedy generation: the same for a seed (and the file byte-identical),
        // different across seeds.
        let prompt = tok_ids(&a);
        let first = greedy(&a, &prompt);
        assert_eq!(first.len(), 6);
        let b = dir.join(format!("b-{tag}.gguf"));
        synthesize(&opts(quant, 1, b.clone())).expect("synthesize");
        assert!(
            std::fs::read(&a).expect("test setup") == std::fs::read(&b).expect("test setup"),
            "{tag}: same seed, different bytes"
        );
        assert_eq!(greedy(&b, &prompt), first, "{tag}: same seed");
        let c2 = dir.join(format!("c-{tag}.gguf"));
        synthesize(&opts(quant, 2, c2.clone())).expect("synthesize");
        assert_ne!(greedy(&c2, &prompt), first, "{tag}: seeds 1 and 2 agree");
        for path in [a, b, c2] {
            std::fs::remove_file(path).expect("test setup");
        }
    }
    std::fs::remove_dir_all(&dir).expect("test setup");
}

fn tok_ids(path: &Path) -> Vec<u32> {
    let f = GgufFile::open(path).expect("test setup");
    crate::tokenizer::Tokenizer::from_gguf(&f)
        .expect("test setup")
        .encode("The quick brown fox", true)
}

#[test]
fn llama_shapes_have_the_real_models_parameter_counts() {
    let count = |shape: Shape| -> (u64, usize, bool) {
        let planned = plan(&shape.params(), GgmlType::Q4_1);
        let params = planned
            .iter()
            .map(|t| t.spec.dims.iter().product::<u64>())
            .sum();
        let bytes = planned
            .iter()
            .map(|t| t.spec.n_bytes().expect("whole blocks"))
            .sum();
        let untied = planned.iter().any(|t| t.spec.name == "output.weight");
        (params, bytes, untied)
    };
    // Llama 3.2 1B and Llama 3.1 8B as Hugging Face counts them.
    assert_eq!(count(Shape::Llama1b).0, 1_235_814_400);
    assert!(!count(Shape::Llama1b).2, "llama-1b ties its embeddings");
    let (params, bytes, untied) = count(Shape::Llama8b);
    assert_eq!(params, 8_030_261_248);
    assert!(untied);
    // About 5 GB in Q4_1 (20 bytes per 32 weights; norms in f32).
    assert!((5_000_000_000..5_030_000_000).contains(&bytes), "{bytes}");
}
