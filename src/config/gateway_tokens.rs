//! The gateway's tokens file (`Z4J_GATEWAY_TOKENS_FILE`): further agent
//! tokens the gateway accepts besides the daemon's own `Z4J_TOKEN`.
//!
//! Format: one token per line, exactly as the brain minted it; blank lines
//! and lines starting with `#` are ignored. The file holds secrets, so it
//! must not be readable by others (mode 0600, or 0640 for a group the
//! daemon's user belongs to); a file others may read is refused.
//!
//! Invariant: no error names a token or quotes a line; errors give the
//! file, the line number and what to change.

use std::path::Path;

use super::small_file::{read_small_file, SmallFileError};
use super::Secret;

/// The largest tokens file read.
pub const MAX_TOKENS_FILE_BYTES: u64 = 256 * 1024;
/// The most tokens one file may list.
pub const MAX_TOKENS: usize = 1024;

/// Reads the tokens of `path`, or says what is wrong with the file.
pub fn read(path: &Path) -> Result<Vec<Secret>, String> {
    let p = path.display();
    check_mode(path)?;
    let bytes = read_small_file(path, MAX_TOKENS_FILE_BYTES).map_err(|e| match e {
        SmallFileError::TooLarge(_) => {
            format!("{p}: {e}; list at most {MAX_TOKENS} tokens, one per line")
        }
        e => format!("{p}: {e}"),
    })?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("{p}: is not UTF-8 text; write one token per line"))?;
    parse(text).map_err(|e| format!("{p}: {e}"))
}

/// The tokens of a file's text.
pub fn parse(text: &str) -> Result<Vec<Secret>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(i) = line.chars().position(|c| !c.is_ascii_graphic()) {
            return Err(format!(
                "line {}: character {} is not printable ASCII (a space inside a token, or an invisible character from a copy?); write one token per line, exactly as minted",
                n + 1,
                i + 1
            ));
        }
        if tokens.len() == MAX_TOKENS {
            return Err(format!(
                "lists more than {MAX_TOKENS} tokens; the gateway accepts at most {MAX_TOKENS}"
            ));
        }
        tokens.push(Secret::new(line.to_string()));
    }
    Ok(tokens)
}

/// Refuses a file that users other than its owner and group may read.
fn check_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(format!(
            "{}: has mode {mode:04o}, so every user of this host may read the tokens in it; run chmod 0600 (or 0640 for the daemon's group) on it",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_one_per_line_comments_and_blank_lines_ignored() {
        let t = parse("\u{feff}# web hosts\nabc-DEF_1\n\n  xyz2  \r\n#x\n").unwrap();
        let got: Vec<&str> = t.iter().map(Secret::expose).collect();
        assert_eq!(got, ["abc-DEF_1", "xyz2"]);
    }

    #[test]
    fn a_line_with_a_space_is_refused_by_line_number_without_the_token() {
        let e = parse("good\nsecret part\n").unwrap_err();
        assert!(e.starts_with("line 2: character 7"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn a_file_others_may_read_is_refused_and_0640_is_accepted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tokens");
        std::fs::write(&f, "tok-1\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read(&f).unwrap_err();
        assert!(e.contains("mode 0644") && e.contains("chmod 0600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(read(&f).unwrap().len(), 1);
    }

    #[test]
    fn more_than_the_limit_is_refused() {
        let text: String = (0..=MAX_TOKENS).map(|i| format!("t{i}\n")).collect();
        assert!(parse(&text).unwrap_err().contains("more than 1024"));
    }
}
