//! `herald templates sync|render`: load the shipped file templates into the
//! store, and render a template from the command line.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;

use herald::config::Settings;
use herald::domain::{Channel, Content, Notification, Priority, Recipient, TemplateRef};
use herald::render::{FileRenderer, Renderer};
use herald::templates::store::{NewTemplate, SyncResult};
use herald::templates::{Engine, StoreRenderer, TemplateContent, TemplateStore, canonical_locale};

#[derive(Subcommand)]
pub enum TemplatesCommand {
    /// Load the files under templates.dir as global templates (no tenant or
    /// app): a new version where the content changed, nothing otherwise.
    ///
    /// Keys with partials (_name.jinja) are skipped: stored templates have no includes.
    Sync {
        /// Directory (default: templates.dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Channels to store each template for (repeatable).
        #[arg(long = "channel", default_values = ["email"])]
        channels: Vec<String>,
    },
    /// Render a template (stored, else the files) and print subject/text/html.
    ///
    /// Example: herald templates render welcome --data templates/welcome/sample.json --locale pt-BR
    Render {
        key: String,
        /// JSON object file with the template data (`-` for stdin).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long)]
        locale: Option<String>,
        #[arg(long, default_value = "email")]
        channel: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        app: Option<String>,
        /// Only the file templates (no database).
        #[arg(long)]
        files_only: bool,
    },
}

pub async fn run(settings: &Settings, command: TemplatesCommand) -> anyhow::Result<()> {
    match command {
        TemplatesCommand::Sync { dir, channels } => {
            let dir = dir.unwrap_or_else(|| settings.templates.dir.clone());
            let channels = channels
                .iter()
                .map(|c| Channel::parse(c).with_context(|| format!("unknown channel {c}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let pool = herald::store::pool(&settings.database)?;
            let store = TemplateStore::new(pool);
            for t in file_templates(&dir, &channels)? {
                let r = store
                    .sync(&t)
                    .await
                    .with_context(|| format!("syncing {}", t.key))?;
                let what = match r {
                    SyncResult::Created => "created".to_string(),
                    SyncResult::Updated(v) => format!("version {v}"),
                    SyncResult::Unchanged => "unchanged".to_string(),
                };
                println!(
                    "{}\t{}\t{}\t{what}",
                    t.key,
                    t.channel,
                    t.locale.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        TemplatesCommand::Render {
            key,
            data,
            locale,
            channel,
            tenant,
            app,
            files_only,
        } => {
            let data = match data {
                None => serde_json::Map::new(),
                Some(p) => {
                    let text = if p.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
                    } else {
                        std::fs::read_to_string(&p)
                            .with_context(|| format!("reading {}", p.display()))?
                    };
                    serde_json::from_str(&text).context("--data must hold a JSON object")?
                }
            };
            let channel = Channel::parse(&channel).context("unknown --channel")?;
            let n = Notification {
                id: "cli".into(),
                request_id: "cli".into(),
                tenant_id: tenant,
                app_id: app,
                channel,
                recipient: Recipient::default(),
                content: Content::Template(TemplateRef { key, locale, data }),
                priority: Priority::Normal,
                category: None,
                scheduled_at: None,
                expires_at: None,
                meta: Default::default(),
                correlation_id: None,
            };
            let files = FileRenderer::new(&settings.templates)?;
            let out = if files_only {
                files.render(&n)?
            } else {
                let pool = herald::store::pool(&settings.database)?;
                let r = StoreRenderer::load(TemplateStore::new(pool), files, &settings.templates)
                    .await
                    .context("loading stored templates (use --files-only without a database)")?;
                r.render(&n)?
            };
            for (name, v) in [
                ("subject", out.subject),
                ("text", out.text),
                ("html", out.html),
            ] {
                if let Some(v) = v {
                    println!("--- {name}\n{v}");
                }
            }
            Ok(())
        }
    }
}

/// Reads `dir/<key>/[<locale>/]{subject,text,html}.jinja` as global templates.
fn file_templates(dir: &Path, channels: &[Channel]) -> anyhow::Result<Vec<NewTemplate>> {
    let mut out = Vec::new();
    let mut keys: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    keys.sort();
    for kdir in keys {
        let Some(key) = kdir
            .file_name()
            .and_then(|s| s.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if key.starts_with('.') {
            continue;
        }
        let mut variants = vec![(None, kdir.clone())];
        let mut subdirs: Vec<_> = std::fs::read_dir(&kdir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        subdirs.sort();
        for d in subdirs {
            if let Some(l) = d.file_name().and_then(|s| s.to_str()) {
                variants.push((Some(canonical_locale(l)), d.clone()));
            }
        }
        let has_partials = variants.iter().any(|(_, d)| {
            std::fs::read_dir(d).is_ok_and(|rd| {
                rd.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().starts_with('_'))
            })
        });
        if has_partials {
            eprintln!("skipping {key}: partials (_*.jinja) are not supported by stored templates");
            continue;
        }
        for (locale, d) in variants {
            let read = |f: &str| -> anyhow::Result<Option<String>> {
                let p = d.join(f);
                if p.is_file() {
                    Ok(Some(
                        std::fs::read_to_string(&p)
                            .with_context(|| format!("reading {}", p.display()))?,
                    ))
                } else {
                    Ok(None)
                }
            };
            let content = TemplateContent {
                engine: Engine::Jinja,
                subject_template: read("subject.jinja")?,
                body_template: read("text.jinja")?,
                html_template: read("html.jinja")?,
                content_type: None,
                variables_schema: None,
            };
            if content.subject_template.is_none()
                && content.body_template.is_none()
                && content.html_template.is_none()
            {
                continue;
            }
            if let Err(e) = content.validate() {
                bail!("{}: {e}", d.display());
            }
            for c in channels {
                out.push(NewTemplate {
                    key: key.clone(),
                    channel: *c,
                    name: Some(format!("{key} (templates/ file)")),
                    tenant_id: None,
                    app_id: None,
                    locale: locale.clone(),
                    content: content.clone(),
                });
            }
        }
    }
    Ok(out)
}
