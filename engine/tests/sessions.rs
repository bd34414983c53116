//! Sessions: delta prefill equals a full recompute of the same conversation (tokens and
//! logits), turns grow the sequence by exactly the new tokens, and the session store keeps
//! sessions between "jobs" (save/load round trip, LRU eviction under a byte budget, atomic
//! writes, model fingerprint checks).

mod common;

use std::ops::ControlFlow;

use kiln_engine::chat::ChatMessage;
use kiln_engine::chat_model::ChatModel;
use kiln_engine::generate::{generate, replay_logits, GenerateOptions, KvMode, Sequence};
use kiln_engine::model::{EngineError, LoadOptions, Logits};
use kiln_engine::session::Session;
use kiln_engine::session_store::SessionStore;

const USERS: [&str; 3] = ["Who are you?", "Where do you come from?", "Thanks, bye!"];

fn opts(kv: KvMode) -> GenerateOptions {
    GenerateOptions {
        max_tokens: 12,
        kv,
        ..Default::default()
    }
}

fn tiny() -> ChatModel {
    ChatModel::tiny(&LoadOptions::default()).unwrap()
}

fn no_stream() -> impl FnMut(u32, &str) -> ControlFlow<()> {
    |_, _| ControlFlow::Continue(())
}

#[test]
fn delta_prefill_equals_a_full_recompute_of_the_conversation() {
    let cm = tiny();
    let mut s = Session::new("t1", &cm).unwrap();
    let mut prev_len = 0;
    for (i, u) in USERS.iter().enumerate() {
        let history_tokens = s.seq.tokens.clone();
        let r = s
            .turn(&cm, u, &opts(KvMode::Cache), &mut no_stream())
            .unwrap();
        assert_eq!(r.turn, i + 1);
        assert_eq!(r.seq_len_before, prev_len);
        // Every token (delta, produced, closing) is in the cache, nothing more.
        assert_eq!(s.seq.cache.len(), s.seq.tokens.len());
        assert_eq!(
            r.seq_len_after,
            prev_len + r.delta_tokens + r.generation.decode_steps + r.closing_tokens
        );
        // Full recompute: the same turn generated from scratch over the whole conversation
        // (history + delta) in replay mode gives the same tokens.
        let whole = &s.seq.tokens[..prev_len + r.delta_tokens];
        assert_eq!(&whole[..prev_len], &history_tokens[..]);
        let mut fresh = Sequence::new(&cm.model);
        let o = GenerateOptions {
            stop_tokens: cm.stop_tokens.clone(),
            ..opts(KvMode::Replay)
        };
        let g = generate(&cm.model, &mut fresh, whole, &o, &mut |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(g.tokens, r.generation.tokens, "turn {}", i + 1);
        // The closed turn ends with <|im_end|>\n.
        let tail = cm
            .tokenizer
            .decode(&s.seq.tokens[s.seq.len() - 2..], false)
            .unwrap();
        assert_eq!(tail, "<|im_end|>\n");
        prev_len = r.seq_len_after;
    }
    // Logits of a next turn over the session cache vs a fresh forward of everything.
    let next = cm
        .tokenizer
        .encode("<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let mut cache = s.seq.cache.clone();
    let a = cm
        .model
        .forward(&next, &mut cache, Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut all = s.seq.tokens.clone();
    all.extend_from_slice(&next);
    let b = cm
        .model
        .forward(&all, &mut cm.model.new_cache(), Logits::All)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let d = common::max_diff(&a, &b[s.seq.len()..]);
    assert!(d < 1e-4, "session vs recompute logits differ by {d}");
    // The whole session equals a recompute: the last logits over the cache match replay.
    assert!(replay_logits(&cm.model, &all)
        .unwrap()
        .iter()
        .zip(&a[a.len() - 1])
        .all(|(x, y)| (x - y).abs() < 1e-4));
}

#[test]
fn replay_sessions_produce_the_same_conversation() {
    let cm = tiny();
    let mut c = Session::new("c", &cm).unwrap();
    let mut r = Session::new("r", &cm).unwrap();
    for u in USERS {
        let a = c
            .turn(&cm, u, &opts(KvMode::Cache), &mut no_stream())
            .unwrap();
        let b = r
            .turn(&cm, u, &opts(KvMode::Replay), &mut no_stream())
            .unwrap();
        assert_eq!(a.generation.tokens, b.generation.tokens);
        assert_eq!(a.seq_len_after, b.seq_len_after);
    }
    assert_eq!(c.seq.tokens, r.seq.tokens);
    assert!(r.seq.cache.is_empty());
    assert_eq!(c.messages, r.messages);
    assert_eq!(c.messages.len(), 6);
}

#[test]
fn sessions_survive_the_store_and_continue_identically() {
    let cm = tiny();
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::open(dir.path(), 64 << 20).unwrap();
    let mut live = Session::new("chat-1", &cm).unwrap();
    live.turn(&cm, USERS[0], &opts(KvMode::Cache), &mut no_stream())
        .unwrap();
    let rep = store.save(&live).unwrap();
    assert!(rep.bytes > live.seq.cache.bytes() && rep.evicted.is_empty());
    // Only the session file remains: the temporary file was renamed into place.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert_eq!(names, vec!["chat-1.session.safetensors".to_string()]);

    // A later "job" loads it and continues; it must match continuing in memory.
    let mut loaded = store.load("chat-1", cm.model.engine()).unwrap().unwrap();
    assert_eq!(loaded.seq.tokens, live.seq.tokens);
    assert_eq!(loaded.messages, live.messages);
    assert_eq!(loaded.seq.cache.len(), live.seq.cache.len());
    let a = live
        .turn(&cm, USERS[1], &opts(KvMode::Cache), &mut no_stream())
        .unwrap();
    let b = loaded
        .turn(&cm, USERS[1], &opts(KvMode::Cache), &mut no_stream())
        .unwrap();
    assert_eq!(a.generation.tokens, b.generation.tokens);
    assert_eq!(live.seq.tokens, loaded.seq.tokens);
    // Cache bits are identical after the round trip.
    let (k1, _) = live.seq.cache.layer(0).unwrap();
    let (k2, _) = loaded.seq.cache.layer(0).unwrap();
    assert_eq!(
        k1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        k2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert!(store.load("unknown", cm.model.engine()).unwrap().is_none());
}

#[test]
fn a_replay_session_resumed_with_the_cache_prefills_what_it_lacks() {
    let cm = tiny();
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::open(dir.path(), 64 << 20).unwrap();
    let mut r = Session::new("mixed", &cm).unwrap();
    let mut c = Session::new("ref", &cm).unwrap();
    r.turn(&cm, USERS[0], &opts(KvMode::Replay), &mut no_stream())
        .unwrap();
    c.turn(&cm, USERS[0], &opts(KvMode::Cache), &mut no_stream())
        .unwrap();
    store.save(&r).unwrap();
    let mut r = store.load("mixed", cm.model.engine()).unwrap().unwrap();
    assert!(r.seq.cache.is_empty());
    let a = r
        .turn(&cm, USERS[1], &opts(KvMode::Cache), &mut no_stream())
        .unwrap();
    let b = c
        .turn(&cm, USERS[1], &opts(KvMode::Cache), &mut no_stream())
        .unwrap();
    assert_eq!(a.generation.tokens, b.generation.tokens);
    assert_eq!(r.seq.cache.len(), r.seq.tokens.len());
}

#[test]
fn the_store_evicts_least_recently_used_sessions_to_stay_in_budget() {
    let cm = tiny();
    let dir = tempfile::tempdir().unwrap();
    let mut one = Session::new("s0", &cm).unwrap();
    one.turn(&cm, USERS[0], &opts(KvMode::Cache), &mut no_stream())
        .unwrap();
    let size = SessionStore::open(dir.path(), u64::MAX)
        .unwrap()
        .save(&one)
        .unwrap()
        .bytes;
    // Room for three sessions of this size.
    let store = SessionStore::open(dir.path(), size * 3 + size / 2).unwrap();
    for id in ["s1", "s2"] {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut s = one.clone();
        s.id = id.into();
        assert!(store.save(&s).unwrap().evicted.is_empty());
    }
    // Use s0 again: s1 becomes the least recently used.
    std::thread::sleep(std::time::Duration::from_millis(20));
    store.load("s0", cm.model.engine()).unwrap().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut s3 = one.clone();
    s3.id = "s3".into();
    let rep = store.save(&s3).unwrap();
    assert_eq!(rep.evicted, vec!["s1".to_string()]);
    assert!(rep.total_bytes <= store.budget_bytes());
    let ids: Vec<String> = store.list().unwrap().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, vec!["s2", "s0", "s3"]);
    // A session bigger than the whole budget is refused, clearly.
    let small = SessionStore::open(dir.path(), size / 2).unwrap();
    let err = small.save(&one).unwrap_err();
    assert!(err.to_string().contains("budget"), "{err}");
}

#[test]
fn sessions_are_tied_to_their_model_and_ids_are_checked() {
    let cm = tiny();
    let mut s = Session::new("x", &cm).unwrap();
    s.model_fingerprint = "another-model".into();
    let err = s
        .turn(&cm, "hi", &opts(KvMode::Cache), &mut no_stream())
        .unwrap_err();
    assert!(matches!(err, EngineError::Session { .. }), "{err}");
    assert!(err.to_string().contains("new session"), "{err}");
    for bad in ["", "../etc", "a/b", ".hidden"] {
        assert!(Session::new(bad, &cm).is_err(), "{bad:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let store = SessionStore::open(dir.path(), 1 << 20).unwrap();
    assert!(store.load("../x", cm.model.engine()).is_err());
    let _ = ChatMessage::user("unused");
}

#[test]
fn a_full_session_is_refused_clearly_and_replies_are_capped_to_fit() {
    let cm = tiny();
    let mut s = Session::new("long", &cm).unwrap();
    let o = GenerateOptions {
        max_tokens: 400,
        ..opts(KvMode::Cache)
    };
    // The first turn leaves less room than max_tokens: the reply is capped so the closed
    // turn ends exactly at the context limit at most.
    let long_question = "tell me a story ".repeat(60);
    let r = s.turn(&cm, &long_question, &o, &mut no_stream()).unwrap();
    assert!(r.seq_len_after <= 512, "{}", r.seq_len_after);
    assert_eq!(s.seq.cache.len(), s.seq.tokens.len());
    let before = (s.seq.tokens.clone(), s.messages.clone());
    let err = s
        .turn(&cm, &long_question, &o, &mut no_stream())
        .unwrap_err();
    assert!(matches!(err, EngineError::PromptTooLong { .. }), "{err}");
    assert!(err.to_string().contains("start a new session"), "{err}");
    assert_eq!(
        (s.seq.tokens.clone(), s.messages.clone()),
        before,
        "a refused turn changes nothing"
    );
}
