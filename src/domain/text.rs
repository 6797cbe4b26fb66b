//! Provider text as Herald publishes and stores it. A provider's reply
//! (a message id, an error body, a receipt) may hold anything; outcome
//! events (`schemas/`) carry no control characters in identifiers, and
//! PostgreSQL's `text` and `jsonb` cannot hold NUL at all, so one such value
//! would fail a whole batched statement.

/// `s` with every control character (CR, LF, NUL, ...) as a space, cut to
/// `max_chars` characters and trimmed: a detail for an error message.
pub fn printable(s: &str, max_chars: usize) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect();
    s.trim().to_string()
}

/// `s` trimmed, when it is usable as an identifier: 1 to `max_chars`
/// characters and no control character. Anything else is treated as absent.
pub fn identifier(s: &str, max_chars: usize) -> Option<String> {
    let s = s.trim();
    (!s.is_empty() && s.chars().count() <= max_chars && !s.chars().any(char::is_control))
        .then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_turns_control_characters_into_spaces_and_bounds_the_length() {
        assert_eq!(printable("  bad\0 thing\r\nhere ", 100), "bad  thing  here");
        assert_eq!(printable("abcdef", 3), "abc");
        assert_eq!(printable("\0\n", 10), "");
    }

    #[test]
    fn an_identifier_with_a_control_character_or_out_of_bounds_is_absent() {
        assert_eq!(identifier(" SM123 ", 10), Some("SM123".to_string()));
        assert_eq!(identifier("SM\0nul", 10), None);
        assert_eq!(identifier("a\u{1}b", 10), None);
        assert_eq!(identifier("   ", 10), None);
        assert_eq!(identifier("abcdef", 5), None);
    }
}
