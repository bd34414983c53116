//! Generation: the KV cache agrees with replay (tokens identical, logits within 1e-4) on the
//! tiny model and every architecture, sampling is seeded, streaming yields the text, and a
//! prompt longer than the context is a clear error.

mod common;

use std::ops::ControlFlow;

use common::*;
use kiln_engine::chat::ChatMessage;
use kiln_engine::chat_model::ChatModel;
use kiln_engine::engine::LoadedModel;
use kiln_engine::generate::{
    ab::ab_compare, generate, GenerateOptions, KvMode, SamplingParams, Sequence, StopReason,
};
use kiln_engine::model::{Architecture, EngineError, LinearFormat, LoadOptions};

/// Stated tolerance of cache vs replay logits (f32, different summation shapes).
const LOGIT_TOL: f32 = 1e-4;

#[test]
fn cache_and_replay_agree_on_the_tiny_model() {
    let cm = ChatModel::tiny(&LoadOptions::default()).unwrap();
    let prompt = cm
        .encode_chat(&[ChatMessage::user("Who are you?")], true)
        .unwrap();
    let opts = GenerateOptions {
        max_tokens: 24,
        ..Default::default()
    };
    let r = ab_compare(&cm.model, &prompt, &opts).unwrap();
    assert!(r.tokens_identical, "{r:?}");
    assert_eq!(r.cache_tokens.len(), 24);
    assert_eq!(r.compared_steps, 24);
    assert!(
        r.max_logit_diff < LOGIT_TOL,
        "max logit diff {}",
        r.max_logit_diff
    );
}

#[test]
fn cache_and_replay_agree_on_every_architecture_and_format() {
    for arch in [
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Llama,
    ] {
        for format in [LinearFormat::Nvfp4, LinearFormat::Dense] {
            let m = LoadedModel::cpu(random_model(&small_config(arch), format));
            let opts = GenerateOptions {
                max_tokens: 12,
                ..Default::default()
            };
            let r = ab_compare(&m, &prompt(11), &opts).unwrap();
            assert!(r.tokens_identical, "{arch:?} {format:?}: {r:?}");
            assert!(
                r.max_logit_diff < LOGIT_TOL,
                "{arch:?} {format:?}: {}",
                r.max_logit_diff
            );
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_identical_in_both_modes() {
    let cm = ChatModel::tiny(&LoadOptions::default()).unwrap();
    let prompt = prompt(6);
    let sampling = SamplingParams {
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        seed: 1234,
    };
    let run = |kv, seed| {
        let o = GenerateOptions {
            max_tokens: 20,
            sampling: SamplingParams { seed, ..sampling },
            kv,
            ..Default::default()
        };
        let mut seq = Sequence::new(&cm.model);
        generate(&cm.model, &mut seq, &prompt, &o, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .tokens
    };
    let a = run(KvMode::Cache, 1234);
    assert_eq!(a, run(KvMode::Cache, 1234));
    assert_eq!(a, run(KvMode::Replay, 1234));
    assert_ne!(
        a,
        run(KvMode::Cache, 99),
        "another seed samples differently"
    );
    let greedy = ab_compare(
        &cm.model,
        &prompt,
        &GenerateOptions {
            max_tokens: 20,
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(a, greedy.cache_tokens, "temperature sampling is not greedy");
}

#[test]
fn generation_stops_at_a_stop_token_and_streams_text() {
    let cm = ChatModel::tiny(&LoadOptions::default()).unwrap();
    let msgs = [ChatMessage::user("Hello")];
    let free = cm
        .generate_chat(
            &msgs,
            &GenerateOptions {
                max_tokens: 10,
                ..Default::default()
            },
            &mut |_, _| ControlFlow::Continue(()),
        )
        .unwrap();
    assert_eq!(free.generation.stop, StopReason::MaxTokens);
    // Make the 4th produced token a stop token: generation must end right there.
    let stop = free.generation.tokens[3];
    let first = free
        .generation
        .tokens
        .iter()
        .position(|&t| t == stop)
        .unwrap();
    let mut streamed = String::new();
    let mut ids = Vec::new();
    let opts = GenerateOptions {
        max_tokens: 10,
        stop_tokens: vec![stop],
        ..Default::default()
    };
    let out = cm
        .generate_chat(&msgs, &opts, &mut |id, text| {
            ids.push(id);
            streamed.push_str(text);
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(out.generation.stop, StopReason::StopToken);
    assert_eq!(out.generation.tokens, free.generation.tokens[..=first]);
    assert_eq!(ids, out.generation.tokens);
    // The pieces concatenate to the text, except that a trailing incomplete UTF-8 sequence
    // (held back while waiting for its next byte) is never streamed.
    assert_eq!(
        streamed,
        out.text.trim_end_matches('\u{FFFD}'),
        "streamed pieces concatenate to the text"
    );
    assert!(out.generation.prefill_ms > 0.0);
    assert!(out.generation.decode_tokens_per_s > 0.0 || out.generation.decode_steps == 0);
    // The callback can cancel.
    let c = cm
        .generate_chat(&msgs, &opts, &mut |_, _| ControlFlow::Break(()))
        .unwrap();
    assert_eq!(
        (c.generation.stop, c.generation.tokens.len()),
        (StopReason::Cancelled, 1)
    );
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let cm = ChatModel::tiny(&LoadOptions::default()).unwrap();
    let long = "word ".repeat(2000);
    let err = cm
        .generate_chat(
            &[ChatMessage::user(long)],
            &GenerateOptions::default(),
            &mut |_, _| ControlFlow::Continue(()),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::PromptTooLong {
                max_context: 512,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("context holds 512"), "{err}");
}

#[test]
fn generation_stops_when_the_context_is_full() {
    let cm = ChatModel::tiny(&LoadOptions::default()).unwrap();
    let p = prompt(500);
    let mut seq = Sequence::new(&cm.model);
    let o = GenerateOptions {
        max_tokens: 100,
        ..Default::default()
    };
    let g = generate(&cm.model, &mut seq, &p, &o, &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(g.stop, StopReason::ContextFull);
    assert_eq!(
        seq.len() + 1,
        512,
        "the last produced token fills the context"
    );
}
