//! Calibration data: text in, token windows out.
//!
//! Sources are plain text files (one document each), JSONL files whose lines carry a `text`
//! string or a `messages` list (rendered through the model's chat template, as transformers'
//! `apply_chat_template` does), or directories of such files (walked recursively, in name order).
//! Documents are tokenized with the base model's tokenizer and concatenated into one stream with a
//! separator token (the end-of-sequence token) between them.
//!
//! The last `val_fraction` of the stream is held out for validation: a contiguous tail, so the
//! split does not depend on how the text is cut into documents and works for a single file; no
//! training window reaches into it. Training windows are `seq_len` tokens starting anywhere in
//! the training part, drawn with a seeded RNG, so a run is reproducible from its seed (and
//! `--dump-windows` writes them out for the reference implementation).
//!
//! The BitDelta reference (`bitdelta/data.py`) instead truncates or pads each C4 document to
//! `max_length`; random windows over a concatenated stream waste no compute on padding and work
//! for long and short documents alike.

use std::path::{Path, PathBuf};

use deltaserve_model::{ChatMessage, TextCodec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Result, TrainError};

/// Extensions read as plain text when a directory is walked (a file named on the command line is
/// read whatever its extension).
const TEXT_EXTENSIONS: &[&str] = &["txt", "text", "md", "rst", "py"];
/// Extensions read as JSONL.
const JSONL_EXTENSIONS: &[&str] = &["jsonl", "json"];

/// One unit of text before tokenization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    /// Plain text, tokenized with the tokenizer's own special tokens (BOS where it adds one).
    Text(String),
    /// A conversation, rendered through the chat template (which places its own special tokens).
    Chat(Vec<ChatMessage>),
}

/// How to cut the token stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DataOptions {
    /// Tokens per window.
    pub seq_len: usize,
    /// Fraction of the token stream held out for validation, in (0, 1).
    pub val_fraction: f64,
}

/// The tokenized calibration set: a training stream and a held-out stream.
#[derive(Debug, Clone)]
pub struct CalibrationData {
    /// Tokens training windows are drawn from.
    pub train: Vec<u32>,
    /// Held-out tokens (the tail of the stream).
    pub val: Vec<u32>,
    /// How many documents the stream was made of.
    pub documents: usize,
    /// The files read, in order.
    pub sources: Vec<PathBuf>,
    opts: DataOptions,
}

/// Lists the files under `paths` (directories walked recursively, sorted) with whether each is JSONL.
pub fn list_files(paths: &[PathBuf]) -> Result<Vec<(PathBuf, bool)>> {
    fn is_jsonl(p: &Path) -> bool {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| JSONL_EXTENSIONS.contains(&e))
    }
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, bool)>) -> Result<()> {
        let read = std::fs::read_dir(dir).map_err(|e| TrainError::BadData {
            path: dir.to_path_buf(),
            msg: format!("cannot list directory: {e}"),
        })?;
        let mut entries: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in entries {
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if p.is_dir() {
                walk(&p, out)?;
            } else if is_jsonl(&p) {
                out.push((p, true));
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| TEXT_EXTENSIONS.contains(&e))
            {
                out.push((p, false));
            }
        }
        Ok(())
    }
    if paths.is_empty() {
        return Err(TrainError::NoData {
            what: "no --data path given".into(),
        });
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let before = out.len();
            walk(p, &mut out)?;
            if out.len() == before {
                return Err(TrainError::NoData {
                    what: format!(
                        "directory {} holds no .{} or .{} files",
                        p.display(),
                        TEXT_EXTENSIONS.join("/."),
                        JSONL_EXTENSIONS.join("/.")
                    ),
                });
            }
        } else if p.is_file() {
            out.push((p.clone(), is_jsonl(p)));
        } else {
            return Err(TrainError::BadData {
                path: p.clone(),
                msg: "no such file or directory".into(),
            });
        }
    }
    Ok(out)
}

/// Reads the documents of one file: the whole file for plain text, one per line for JSONL.
pub fn read_documents(path: &Path, jsonl: bool) -> Result<Vec<Document>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::BadData {
        path: path.to_path_buf(),
        msg: format!("cannot read as UTF-8 text: {e}"),
    })?;
    if !jsonl {
        return Ok(if text.trim().is_empty() {
            vec![]
        } else {
            vec![Document::Text(text)]
        });
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || PathBuf::from(format!("{}:{}", path.display(), i + 1));
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| TrainError::BadData {
                path: at(),
                msg: format!("not JSON: {e}"),
            })?;
        if let Some(t) = value.get("text").and_then(|t| t.as_str()) {
            if !t.trim().is_empty() {
                docs.push(Document::Text(t.to_string()));
            }
        } else if let Some(m) = value.get("messages") {
            let messages: Vec<ChatMessage> =
                serde_json::from_value(m.clone()).map_err(|e| TrainError::BadData {
                    path: at(),
                    msg: format!(
                        "`messages` must be a list of {{\"role\", \"content\"}} objects: {e}"
                    ),
                })?;
            if !messages.is_empty() {
                docs.push(Document::Chat(messages));
            }
        } else {
            return Err(TrainError::BadData {
                path: at(),
                msg: "expected an object with a `text` string or a `messages` list".into(),
            });
        }
    }
    Ok(docs)
}

/// Tokenizes one document with the base tokenizer.
pub fn tokenize(doc: &Document, codec: &TextCodec) -> Result<Vec<u32>> {
    Ok(match doc {
        Document::Text(t) => codec.encode(t, true)?,
        // transformers' apply_chat_template(tokenize=True) encodes without adding special tokens:
        // the template writes its own.
        Document::Chat(m) => codec.encode(&codec.render_chat(m, false)?, false)?,
    })
}

/// The smallest stream length with at least `seq_len` training tokens and 2 held-out tokens
/// (one prediction) once `val_fraction` is held out.
pub fn tokens_needed(opts: &DataOptions) -> usize {
    let mut n = opts.seq_len + 1;
    while {
        let val = held_out_len(n, opts.val_fraction);
        n - val < opts.seq_len || val < 2
    } {
        n += 1;
    }
    n
}

fn held_out_len(total: usize, fraction: f64) -> usize {
    ((total as f64 * fraction).ceil() as usize).min(total)
}

impl CalibrationData {
    /// Reads, tokenizes and splits every file under `paths`. `separator` (the EOS id) goes between
    /// documents; `None` concatenates them directly.
    pub fn load(
        paths: &[PathBuf],
        codec: &TextCodec,
        separator: Option<u32>,
        opts: DataOptions,
    ) -> Result<Self> {
        let files = list_files(paths)?;
        let mut docs = Vec::new();
        for (path, jsonl) in &files {
            for d in read_documents(path, *jsonl)? {
                docs.push(tokenize(&d, codec)?);
            }
        }
        let sources = files.into_iter().map(|(p, _)| p).collect();
        Self::from_token_documents(docs, separator, opts, sources)
    }

    /// Builds the streams from documents that are already tokens.
    pub fn from_token_documents(
        docs: Vec<Vec<u32>>,
        separator: Option<u32>,
        opts: DataOptions,
        sources: Vec<PathBuf>,
    ) -> Result<Self> {
        if opts.seq_len < 2 {
            return Err(TrainError::Setting(format!(
                "--seq-len {}: a window needs at least 2 tokens",
                opts.seq_len
            )));
        }
        if !(opts.val_fraction > 0.0 && opts.val_fraction < 1.0) {
            return Err(TrainError::Setting(format!(
                "--val-fraction {}: must be between 0 and 1 (exclusive)",
                opts.val_fraction
            )));
        }
        let describe = |sources: &[PathBuf]| match sources {
            [] => "the given documents".to_string(),
            [one] => one.display().to_string(),
            many => format!("{} files ({}, ...)", many.len(), many[0].display()),
        };
        let docs: Vec<Vec<u32>> = docs.into_iter().filter(|d| !d.is_empty()).collect();
        if docs.is_empty() {
            return Err(TrainError::NoData {
                what: format!("{} hold no text", describe(&sources)),
            });
        }
        let documents = docs.len();
        let mut stream = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
        for (i, d) in docs.into_iter().enumerate() {
            if i > 0 {
                stream.extend(separator);
            }
            stream.extend(d);
        }
        let needed = tokens_needed(&opts);
        if stream.len() < needed {
            return Err(TrainError::TooShort {
                found: stream.len(),
                needed,
                sources: format!(
                    "{} ({documents} document{})",
                    describe(&sources),
                    if documents == 1 { "" } else { "s" }
                ),
                seq_len: opts.seq_len,
                val_fraction: opts.val_fraction,
            });
        }
        let val_len = held_out_len(stream.len(), opts.val_fraction);
        let val = stream.split_off(stream.len() - val_len);
        Ok(Self {
            train: stream,
            val,
            documents,
            sources,
            opts,
        })
    }

    /// Tokens per window.
    pub fn seq_len(&self) -> usize {
        self.opts.seq_len
    }

    /// The options the data was cut with.
    pub fn options(&self) -> DataOptions {
        self.opts
    }

    /// Every training step's windows: `steps` batches of `batch_size` windows of `seq_len` tokens,
    /// with start positions drawn uniformly from the training stream by an RNG seeded with `seed`.
    pub fn training_batches(
        &self,
        steps: usize,
        batch_size: usize,
        seed: u64,
    ) -> Vec<Vec<Vec<u32>>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let last_start = self.train.len() - self.opts.seq_len;
        (0..steps)
            .map(|_| {
                (0..batch_size)
                    .map(|_| {
                        let s = rng.gen_range(0..=last_start);
                        self.train[s..s + self.opts.seq_len].to_vec()
                    })
                    .collect()
            })
            .collect()
    }

    /// The held-out stream cut into consecutive windows of `seq_len` tokens (the last may be shorter,
    /// if it has at least 2), at most `max` of them.
    pub fn validation_windows(&self, max: usize) -> Vec<Vec<u32>> {
        self.val
            .chunks(self.opts.seq_len)
            .filter(|c| c.len() >= 2)
            .take(max)
            .map(<[u32]>::to_vec)
            .collect()
    }
}

/// What `--dump-windows` writes: the exact windows of a run, for `scripts/reference/`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct WindowDump {
    /// Tokens per window.
    pub seq_len: usize,
    /// The seed the training windows were drawn with.
    pub seed: u64,
    /// `train[step][row]`: the windows of each step.
    pub train: Vec<Vec<Vec<u32>>>,
    /// The validation windows.
    pub val: Vec<Vec<u32>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seq_len: usize, val_fraction: f64) -> DataOptions {
        DataOptions {
            seq_len,
            val_fraction,
        }
    }

    #[test]
    fn separator_goes_between_documents_and_tail_is_held_out() {
        let docs = vec![(0..30).collect::<Vec<u32>>(), (100..130).collect()];
        let d =
            CalibrationData::from_token_documents(docs, Some(999), opts(8, 0.1), vec![]).unwrap();
        // 61 tokens, ceil(6.1) = 7 held out.
        assert_eq!(d.train.len() + d.val.len(), 61);
        assert_eq!(d.val.len(), 7);
        assert_eq!(d.train[30], 999);
        assert_eq!(d.val, (123..130).collect::<Vec<u32>>());
    }

    #[test]
    fn windows_are_seeded_and_stay_in_the_training_part() {
        let docs = vec![(0..1000).collect::<Vec<u32>>()];
        let d = CalibrationData::from_token_documents(docs, None, opts(16, 0.1), vec![]).unwrap();
        let a = d.training_batches(20, 4, 7);
        assert_eq!(a, d.training_batches(20, 4, 7));
        assert_ne!(a, d.training_batches(20, 4, 8));
        for w in a.iter().flatten() {
            assert_eq!(w.len(), 16);
            assert!(w.iter().all(|&t| (t as usize) < d.train.len()));
            assert!(
                w.windows(2).all(|p| p[1] == p[0] + 1),
                "a window is a contiguous slice"
            );
        }
        let v = d.validation_windows(100);
        assert_eq!(v.concat(), d.val);
        assert_eq!(d.validation_windows(2).len(), 2);
    }

    #[test]
    fn too_short_says_found_and_needed() {
        let needed = tokens_needed(&opts(128, 0.1));
        // 128 training tokens need 143 in all: ceil(0.1 * 143) = 15 held out leaves 128.
        assert_eq!(needed, 143);
        let e = CalibrationData::from_token_documents(
            vec![vec![1; 100]],
            None,
            opts(128, 0.1),
            vec!["a.txt".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("100 tokens") && e.contains("at least 143") && e.contains("a.txt"),
            "{e}"
        );
        assert!(CalibrationData::from_token_documents(
            vec![vec![1; 143]],
            None,
            opts(128, 0.1),
            vec![]
        )
        .is_ok());
    }

    #[test]
    fn no_documents_is_no_data() {
        let e =
            CalibrationData::from_token_documents(vec![vec![], vec![]], None, opts(8, 0.1), vec![])
                .unwrap_err();
        assert!(matches!(e, TrainError::NoData { .. }), "{e}");
    }

    #[test]
    fn jsonl_reads_text_and_messages_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"text\": \"hello\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
        )
        .unwrap();
        let docs = read_documents(&p, true).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0], Document::Text("hello".into()));
        assert!(matches!(&docs[1], Document::Chat(m) if m[0].content == "hi"));
        std::fs::write(&p, "{\"text\": \"ok\"}\n{\"other\": 1}\n").unwrap();
        let e = read_documents(&p, true).unwrap_err().to_string();
        assert!(e.contains("d.jsonl:2") && e.contains("`text`"), "{e}");
    }

    #[test]
    fn directories_are_walked_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b.txt"), "b").unwrap();
        std::fs::write(dir.path().join("a.jsonl"), "").unwrap();
        std::fs::write(dir.path().join("sub/c.md"), "c").unwrap();
        std::fs::write(dir.path().join("skip.bin"), "x").unwrap();
        std::fs::write(dir.path().join(".hidden.txt"), "x").unwrap();
        let files = list_files(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|(p, j)| format!("{}:{j}", p.strip_prefix(dir.path()).unwrap().display()))
            .collect();
        assert_eq!(names, ["a.jsonl:true", "b.txt:false", "sub/c.md:false"]);
        let empty = tempfile::tempdir().unwrap();
        let e = list_files(&[empty.path().to_path_buf()]).unwrap_err();
        assert!(matches!(e, TrainError::NoData { .. }), "{e}");
    }
}
