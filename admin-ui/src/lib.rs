//! The web UI for municipal staff, venue operators and auditors: three static files the node
//! serves under `/ui/`. No build step and no third-party script: the pages call the node's
//! own API (`/api/v1/…`) with the session cookie and its CSRF token, and build every element
//! from text (never from HTML), so the strict content security policy below holds.

/// One file of the UI.
#[derive(Debug)]
pub struct Asset {
    /// Name under `/ui/` (`""` is the page itself).
    pub name: &'static str,
    /// `Content-Type` header.
    pub content_type: &'static str,
    /// The bytes served.
    pub body: &'static [u8],
}

/// Every file the UI consists of.
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../static/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../static/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../static/app.css"),
    },
];

/// The content security policy of the UI's responses: its own script, style and API only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The file served at `/ui/{name}`.
pub fn asset(name: &str) -> Option<&'static Asset> {
    let name = if name == "index.html" { "" } else { name };
    ASSETS.iter().find(|a| a.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_script_and_style() {
        let page = std::str::from_utf8(asset("").unwrap().body).unwrap();
        assert!(page.contains(r#"<html lang="ja">"#), "Japanese first");
        assert!(page.contains(r#"src="app.js""#) && page.contains(r#"href="app.css""#));
        assert!(!page.contains("<script>") && !page.contains("style="), "nothing inline: the CSP forbids it");
        assert!(asset("index.html").is_some() && asset("../Cargo.toml").is_none());
    }

    #[test]
    fn the_script_never_parses_html_from_data() {
        let script = std::str::from_utf8(asset("app.js").unwrap().body).unwrap();
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
            assert!(!script.contains(sink), "app.js uses {sink}");
        }
    }
}
