//! The resolution chain: which stored template serves a (key, channel,
//! tenant, app, locale).
//!
//! Locales, in order: the template's requested locale, then the recipient's
//! (each followed by its shorter forms: `pt-BR` → `pt`), then the default
//! locale (`templates.default_locale`, `en`). Per-tenant default locales are
//! not modelled (there is no tenant table yet).
//!
//! Scopes, most specific first: (tenant, app), (tenant, –), (–, –). In each
//! scope every locale of the chain is tried, then the unlocalized template:
//! (t, a, pt-BR) → (t, a, pt) → (t, a, en) → (t, a, –) → (t, –, pt-BR) → … →
//! (t, –, –) → (–, –, pt-BR) → … → (–, –, –). This contains the issue's chain
//! (tenant, app, locale) → (tenant, app, –) → (tenant, –, –) → (–, –, locale)
//! → (–, –, –) in that order, plus (tenant, –, locale) before (tenant, –, –).

use crate::render::normalize_locale;

/// The scope of one stored template, as the resolver sees it.
pub trait Scoped {
    fn tenant_id(&self) -> Option<&str>;
    fn app_id(&self) -> Option<&str>;
    /// Normalized (`pt-br`) or `None` for the unlocalized template.
    fn locale_norm(&self) -> Option<&str>;
}

/// The locale candidates, normalized and deduplicated, most specific first.
pub fn locale_chain(
    requested: Option<&str>,
    recipient: Option<&str>,
    default_locale: &str,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for loc in [requested, recipient, Some(default_locale)]
        .into_iter()
        .flatten()
    {
        let mut loc = normalize_locale(loc);
        loop {
            if !loc.is_empty() && !out.contains(&loc) {
                out.push(loc.clone());
            }
            match loc.rfind('-') {
                Some(i) => loc.truncate(i),
                None => break,
            }
        }
    }
    out
}

/// The (tenant, app, locale) candidates in order (see the module docs).
pub fn candidates<'a>(
    tenant: Option<&'a str>,
    app: Option<&'a str>,
    locales: &'a [String],
) -> Vec<(Option<&'a str>, Option<&'a str>, Option<&'a str>)> {
    let mut scopes: Vec<(Option<&str>, Option<&str>)> = Vec::new();
    if let (Some(t), Some(a)) = (tenant, app) {
        scopes.push((Some(t), Some(a)));
    }
    if let Some(t) = tenant {
        scopes.push((Some(t), None));
    }
    scopes.push((None, None));
    let mut out = Vec::new();
    for (t, a) in scopes {
        for l in locales {
            out.push((t, a, Some(l.as_str())));
        }
        out.push((t, a, None));
    }
    out
}

/// Picks the first template of `templates` (all of one key and channel)
/// along the chain.
pub fn resolve<'t, T: Scoped>(
    templates: &'t [T],
    tenant: Option<&str>,
    app: Option<&str>,
    locales: &[String],
) -> Option<&'t T> {
    for (t, a, l) in candidates(tenant, app, locales) {
        if let Some(found) = templates
            .iter()
            .find(|x| x.tenant_id() == t && x.app_id() == a && x.locale_norm() == l)
        {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    struct T(
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
    );
    impl Scoped for T {
        fn tenant_id(&self) -> Option<&str> {
            self.0
        }
        fn app_id(&self) -> Option<&str> {
            self.1
        }
        fn locale_norm(&self) -> Option<&str> {
            self.2
        }
    }

    #[test]
    fn locale_chain_strips_regions_and_ends_with_default() {
        assert_eq!(
            locale_chain(Some("pt_BR"), Some("fr-CA"), "en"),
            vec!["pt-br", "pt", "fr-ca", "fr", "en"]
        );
        assert_eq!(locale_chain(None, None, "en-US"), vec!["en-us", "en"]);
        assert_eq!(locale_chain(Some("en"), None, "en"), vec!["en"]);
    }

    #[test]
    fn chain_falls_back_step_by_step() {
        let all = vec![
            T(None, None, None),
            T(None, None, Some("pt")),
            T(Some("acme"), None, None),
            T(Some("acme"), Some("shop"), None),
            T(Some("acme"), Some("shop"), Some("pt-br")),
        ];
        let locales = locale_chain(Some("pt-BR"), None, "en");
        let pick = |ts: &[T], t, a| {
            let r = resolve(ts, t, a, &locales).unwrap();
            (r.0, r.1, r.2)
        };
        assert_eq!(
            pick(&all, Some("acme"), Some("shop")),
            (Some("acme"), Some("shop"), Some("pt-br"))
        );
        assert_eq!(
            pick(&all[..4], Some("acme"), Some("shop")),
            (Some("acme"), Some("shop"), None)
        );
        assert_eq!(
            pick(&all[..3], Some("acme"), Some("shop")),
            (Some("acme"), None, None)
        );
        assert_eq!(
            pick(&all[..2], Some("acme"), Some("shop")),
            (None, None, Some("pt"))
        );
        assert_eq!(pick(&all[..1], Some("acme"), None), (None, None, None));
        // Another tenant never sees acme's templates.
        assert_eq!(
            pick(&all, Some("other"), Some("shop")),
            (None, None, Some("pt"))
        );
        assert!(resolve::<T>(&[], None, None, &locales).is_none());
    }
}
