//! Calibration data through the real tokenizer path: text, JSONL `text`, JSONL `messages`
//! rendered by the chat template, directories.

mod common;

use deltaserve_model::TextCodec;
use deltaserve_train::{CalibrationData, DataOptions};

#[test]
fn text_jsonl_and_chat_messages_become_one_stream_with_eos_between_documents() {
    let dir = tempfile::tempdir().unwrap();
    common::write_tokenizer(dir.path());
    let codec = TextCodec::from_dir(dir.path(), &[]).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("a.txt"), "abc").unwrap();
    std::fs::write(
        data.join("b.jsonl"),
        "{\"text\": \"de\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
    )
    .unwrap();
    let opts = DataOptions {
        seq_len: 4,
        val_fraction: 0.1,
    };
    let d = CalibrationData::load(std::slice::from_ref(&data), &codec, Some(256), opts).unwrap();
    assert_eq!(d.documents, 3);
    assert_eq!(d.sources.len(), 2);
    let stream: Vec<u32> = d.train.iter().chain(&d.val).copied().collect();
    // Byte-level tokens: one id per byte; 256 = <|endoftext|> between documents; the chat is
    // rendered as "<|user|>\nhi<|end|>\n<|assistant|>\nyo<|end|>\n" (257, 259, 258 specials).
    let chat: Vec<u32> = [257, 10, 104, 105, 259, 10, 258, 10, 121, 111, 259, 10].to_vec();
    let mut want: Vec<u32> = b"abc".iter().map(|&b| u32::from(b)).collect();
    want.push(256);
    want.extend(b"de".iter().map(|&b| u32::from(b)));
    want.push(256);
    want.extend(chat);
    assert_eq!(stream, want);
}
