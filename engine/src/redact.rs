//! Passwords inside URLs never reach a log, an error, `check-config` or a metric: every URL the
//! engine prints goes through [`url`], and every error text it prints through [`text`].

/// What stands in for a password.
pub const REDACTED: &str = "[redacted]";

/// `postgres://user:pw@host/db?password=pw` → `postgres://user:[redacted]@host/db?password=[redacted]`.
/// A URL without credentials comes back unchanged.
pub fn url(url: &str) -> String {
    text(url)
}

/// `scheme://user:pw@host/...` → `scheme://host/...`: a URL's identity without who connects.
pub fn without_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Every URL inside `text` with its password (userinfo or a `password=` parameter) redacted.
pub fn text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .unwrap_or(after.len());
        let (found, tail) = after.split_at(end);
        out.push_str(&redact_one(found));
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// One URL without its scheme: `user:pw@host/path?query`.
fn redact_one(url: &str) -> String {
    let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
    let (authority, path) = url.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}:{REDACTED}{}", &userinfo[..colon], &authority[at..]),
                // A lone token (`nats://token@host`) is a secret too.
                None if !userinfo.is_empty() && is_token_scheme_userinfo(userinfo) => {
                    format!("{REDACTED}{}", &authority[at..])
                }
                None => authority.to_string(),
            }
        }
        None => authority.to_string(),
    };
    format!("{authority}{}", redact_query(path))
}

/// A userinfo without a colon is a user name for most schemes but a token for NATS; names are
/// short words, tokens long strings, so anything past 24 characters is treated as a token.
fn is_token_scheme_userinfo(userinfo: &str) -> bool {
    userinfo.len() > 24
}

/// `?sslmode=require&password=pw` → `?sslmode=require&password=[redacted]`.
fn redact_query(path: &str) -> String {
    let Some(q) = path.find('?') else {
        return path.to_string();
    };
    let (head, query) = path.split_at(q + 1);
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_param(name) => format!("{name}={REDACTED}"),
            _ => pair.to_string(),
        })
        .collect();
    format!("{head}{}", parts.join("&"))
}

fn is_secret_param(name: &str) -> bool {
    matches!(
        name.to_ascii_lowercase().as_str(),
        "password" | "pass" | "token" | "auth_token" | "secret"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            url("postgres://user:pw@host:5432/db"),
            "postgres://user:[redacted]@host:5432/db"
        );
        assert_eq!(
            url("rediss://default:s3cret@cache:6380/0"),
            "rediss://default:[redacted]@cache:6380/0"
        );
        assert_eq!(
            url("postgres://host/db?sslmode=require&password=pw"),
            "postgres://host/db?sslmode=require&password=[redacted]"
        );
        assert_eq!(
            url("nats://0123456789abcdef0123456789abcdef@host:4222"),
            "nats://[redacted]@host:4222"
        );
        assert_eq!(url("nats://app@host"), "nats://app@host");
        assert_eq!(url("http://127.0.0.1:3000/x"), "http://127.0.0.1:3000/x");
        // A password holding `@` or `:` is redacted whole.
        assert_eq!(
            url("postgres://u:p@ss:w@host/db"),
            "postgres://u:[redacted]@host/db"
        );
    }

    #[test]
    fn urls_inside_text_are_redacted() {
        assert_eq!(
            text("cannot connect to \"postgres://u:pw@h/db\": refused; also redis://:x@r:1"),
            "cannot connect to \"postgres://u:[redacted]@h/db\": refused; also redis://:[redacted]@r:1"
        );
        assert_eq!(text("no url here"), "no url here");
    }
}
