//! `herald keys create|revoke`: API key management. The token is printed
//! once (stdout); only its SHA-256 is stored.

use anyhow::{Context, bail};
use clap::Subcommand;

use herald::config::Settings;
use herald::http::api::auth::{self, Role};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its token (shown only this once).
    ///
    /// Example: herald keys create --role user --tenant acme --user u-42
    Create {
        /// admin (everything), service (submit and read notifications) or
        /// user (only its own notifications and preferences).
        #[arg(long)]
        role: String,
        /// Tenant a user or service key is bound to.
        #[arg(long)]
        tenant: Option<String>,
        /// User id of a user key (required for --role user).
        #[arg(long)]
        user: Option<String>,
        /// A label for humans.
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke a key by its id (key_...).
    Revoke { id: String },
}

pub async fn run(settings: &Settings, command: KeysCommand) -> anyhow::Result<()> {
    let pool = herald::store::pool(&settings.database)?;
    match command {
        KeysCommand::Create {
            role,
            tenant,
            user,
            name,
        } => {
            let Some(role) = Role::parse(&role) else {
                bail!("--role must be admin, service or user");
            };
            let key = auth::create_key(
                &pool,
                role,
                tenant.as_deref(),
                user.as_deref(),
                name.as_deref(),
            )
            .await
            .context("creating the key")?;
            eprintln!(
                "created {} ({}); the token is shown only once:",
                key.id,
                role.as_str()
            );
            println!("{}", key.token);
            Ok(())
        }
        KeysCommand::Revoke { id } => {
            if auth::revoke_key(&pool, &id).await.context("revoking")? {
                println!("revoked {id}");
                Ok(())
            } else {
                bail!("no active key {id}")
            }
        }
    }
}
