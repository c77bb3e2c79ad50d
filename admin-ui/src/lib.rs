//! The web UI for municipal staff, venue operators and auditors: three static files the node
//! serves under `/ui/`; and the national node's page of figures ([`NATIONAL_ASSETS`]), which
//! sends a national API token instead of a session. No build step and no third-party script: the pages call the node's
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

/// The style both pages use.
const STYLE: Asset = Asset {
    name: "app.css",
    content_type: "text/css; charset=utf-8",
    body: include_bytes!("../static/app.css"),
};

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
    STYLE,
];

/// Every file of the national node's page, served by the national node under `/ui/`.
pub const NATIONAL_ASSETS: &[Asset] = &[
    Asset {
        name: "",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../static/national.html"),
    },
    Asset {
        name: "national.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../static/national.js"),
    },
    STYLE,
];

/// The content security policy of the UI's responses: its own script, style and API only.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The file served at `/ui/{name}`.
pub fn asset(name: &str) -> Option<&'static Asset> {
    let name = if name == "index.html" { "" } else { name };
    ASSETS.iter().find(|a| a.name == name)
}

/// The file served at `/ui/{name}` by the national node.
pub fn national_asset(name: &str) -> Option<&'static Asset> {
    let name = if name == "index.html" { "" } else { name };
    NATIONAL_ASSETS.iter().find(|a| a.name == name)
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
    fn the_national_page_loads_only_its_own_script_and_style() {
        let page = std::str::from_utf8(national_asset("").unwrap().body).unwrap();
        assert!(page.contains(r#"<html lang="ja">"#), "Japanese first");
        assert!(page.contains(r#"src="national.js""#) && page.contains(r#"href="app.css""#));
        assert!(!page.contains("<script>") && !page.contains("style="), "nothing inline: the CSP forbids it");
        assert!(national_asset("app.js").is_none(), "the staff UI is not the national node's");
    }

    #[test]
    fn the_scripts_never_parse_html_from_data() {
        for name in ["app.js", "national.js"] {
            let asset = asset(name).or_else(|| national_asset(name)).unwrap();
            let script = std::str::from_utf8(asset.body).unwrap();
            for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
                assert!(!script.contains(sink), "{name} uses {sink}");
            }
        }
    }
}
