//! Outgoing mail (password reset links, invitations, budget alerts): through SMTP when
//! `TOLLGATE_SMTP_URL` is set, else written to the log for the operator to relay. Links are
//! sent in the background ([`Mailer::send`]: a failure is logged without the link, which is a
//! secret, and the person asks again); alerts are sent by a job that retries
//! ([`Mailer::deliver`]).

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use tollgate_core::Config;

pub enum Mailer {
    /// No SMTP configured: mail goes to the log.
    Log,
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
    },
}

impl Mailer {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let Some(url) = &config.smtp_url else { return Ok(Mailer::Log) };
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose_secret())
            .map_err(|e| anyhow::anyhow!("TOLLGATE_SMTP_URL: {e}"))?
            .build();
        let from = config.smtp_from.parse::<Mailbox>().map_err(|e| anyhow::anyhow!("TOLLGATE_SMTP_FROM: {e}"))?;
        Ok(Mailer::Smtp { transport, from })
    }

    /// Whether mail really leaves (SMTP is configured).
    pub fn is_configured(&self) -> bool {
        matches!(self, Mailer::Smtp { .. })
    }

    /// Sends a message now and says whether the SMTP server took it.
    pub async fn deliver(&self, to: &str, subject: &str, body: String) -> Result<(), String> {
        let Mailer::Smtp { transport, from } = self else {
            return Err("no SMTP server configured (TOLLGATE_SMTP_URL)".to_owned());
        };
        let recipient = to.parse::<Mailbox>().map_err(|e| e.to_string())?;
        let message = Message::builder()
            .from(from.clone())
            .to(recipient)
            .subject(subject)
            .body(body)
            .map_err(|e| e.to_string())?;
        transport.send(message).await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// Sends `body` to `to` in the background. Without SMTP, `link` (the one thing the mail
    /// carries that matters) is logged for the operator to relay.
    pub fn send(self: &std::sync::Arc<Self>, to: &str, subject: &str, body: String, link: &str) {
        let (to, subject, link) = (to.to_owned(), subject.to_owned(), link.to_owned());
        let mailer = self.clone();
        tokio::spawn(async move {
            match mailer.as_ref() {
                Mailer::Log => tracing::warn!(%to, %subject, %link, "no SMTP configured: relay this link"),
                Mailer::Smtp { transport, from } => {
                    let message = to.parse::<Mailbox>().map_err(|e| e.to_string()).and_then(|recipient| {
                        Message::builder()
                            .from(from.clone())
                            .to(recipient)
                            .subject(&subject)
                            .body(body)
                            .map_err(|e| e.to_string())
                    });
                    let outcome = match message {
                        Ok(message) => transport.send(message).await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    };
                    match outcome {
                        Ok(()) => tracing::info!(%to, %subject, "mail sent"),
                        Err(e) => tracing::error!(%to, %subject, error = %e, "mail could not be sent"),
                    }
                }
            }
        });
    }
}
