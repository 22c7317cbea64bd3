//! Generated ids to streamed text: incremental detokenization and stop strings.
//!
//! Decoding one token at a time is wrong for tokens that hold part of a UTF-8 character or whose
//! leading space depends on the token before, so each step decodes a short window of recent ids
//! twice (with and without the new one) and emits the difference, as TGI's `decode_token` does
//! (`router/src/infer/mod.rs`). Text that could be the start of a stop string is held back until
//! it is known not to be one, so a client never sees part of a stop string.

/// Streams the text of generated token ids.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// End of what has been turned into text.
    read: usize,
    /// All text so far.
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stops: Vec<String>,
}

/// What one token added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Text to hand out now (may be empty).
    pub delta: String,
    /// A stop string was found: the text ends before it and generation should stop.
    pub stopped: bool,
}

impl TextStream {
    /// A stream that stops at any of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// All text handed out so far.
    pub fn emitted(&self) -> &str {
        &self.text[..self.emitted]
    }

    /// Adds a token; `decode` turns ids into text (skipping special tokens).
    pub fn push<E>(
        &mut self,
        id: u32,
        decode: impl Fn(&[u32]) -> Result<String, E>,
    ) -> Result<Pushed, E> {
        self.ids.push(id);
        let before = decode(&self.ids[self.prefix..self.read])?;
        let now = decode(&self.ids[self.prefix..])?;
        let old_len = self.text.len();
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(new) = now.get(before.len()..) {
                self.text.push_str(new);
                self.prefix = self.read;
                self.read = self.ids.len();
            }
        }
        Ok(self.check_stops(old_len))
    }

    fn check_stops(&mut self, old_len: usize) -> Pushed {
        // A stop string that ends in the new text starts at most `longest - 1` bytes before it.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = old_len.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        if let Some(at) = hit {
            self.text.truncate(from + at);
            let delta = self
                .text
                .get(self.emitted..)
                .unwrap_or_default()
                .to_string();
            self.emitted = self.text.len();
            return Pushed {
                delta,
                stopped: true,
            };
        }
        let safe = self.text.len() - self.held_back();
        let delta = self
            .text
            .get(self.emitted..safe)
            .unwrap_or_default()
            .to_string();
        self.emitted = self.emitted.max(safe);
        Pushed {
            delta,
            stopped: false,
        }
    }

    /// Bytes at the end of the text that are a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > hold && self.text.ends_with(&stop[..i]) {
                    hold = i;
                }
            }
        }
        hold
    }

    /// Hands out whatever was held back (generation ended without a stop string).
    pub fn flush(&mut self) -> String {
        let rest = self
            .text
            .get(self.emitted..)
            .unwrap_or_default()
            .to_string();
        self.emitted = self.text.len();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary: id i is the i-th string; 9 and 10 are the two halves of "é".
    fn decode(ids: &[u32]) -> Result<String, ()> {
        let vocab = [
            "Hello", " world", "!", " END", "x", "EN", "D", "y", "", "", "",
        ];
        let mut bytes = Vec::new();
        for &i in ids {
            match i {
                9 => bytes.push(0xC3),
                10 => bytes.push(0xA9),
                i => bytes.extend_from_slice(vocab[i as usize].as_bytes()),
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn run(stops: &[&str], ids: &[u32]) -> (Vec<String>, bool, String) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        for &id in ids {
            let p = s.push(id, decode).unwrap();
            deltas.push(p.delta);
            if p.stopped {
                return (deltas, true, s.emitted().to_string());
            }
        }
        deltas.push(s.flush());
        (deltas, false, s.emitted().to_string())
    }

    #[test]
    fn text_streams_token_by_token() {
        let (d, stopped, all) = run(&[], &[0, 1, 2]);
        assert_eq!(d, ["Hello", " world", "!", ""]);
        assert!(!stopped);
        assert_eq!(all, "Hello world!");
    }

    #[test]
    fn split_character_waits_for_its_second_half() {
        let (d, _, all) = run(&[], &[0, 9, 10]);
        assert_eq!(d, ["Hello", "", "é", ""]);
        assert_eq!(all, "Helloé");
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_never_shown() {
        // "END" arrives as "EN", "D": the partial "EN" is held back, then dropped.
        let (d, stopped, all) = run(&["END"], &[4, 5, 6, 7]);
        assert!(stopped);
        assert_eq!(all, "x");
        assert_eq!(d.concat(), "x");
        assert!(d.iter().all(|t| !t.contains('E')), "{d:?}");
    }

    #[test]
    fn held_back_prefix_is_released_when_it_is_not_a_stop() {
        let (d, stopped, all) = run(&["END!"], &[5, 7]);
        assert!(!stopped);
        assert_eq!(d, ["", "ENy", ""]);
        assert_eq!(all, "ENy");
    }

    #[test]
    fn stop_string_inside_one_token() {
        let (_, stopped, all) = run(&[" world"], &[0, 1, 2]);
        assert!(stopped);
        assert_eq!(all, "Hello");
    }
}
