//! A stand-in SMTP server over real TCP: it accepts every message and keeps it, so a test
//! can read what Tollgate mailed (recipients and the raw message, quoted-printable and all).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Debug, Clone)]
pub struct Mail {
    pub recipients: Vec<String>,
    pub data: String,
}

impl Mail {
    /// The message with quoted-printable soft line breaks and `=3D` undone, enough to find a link.
    pub fn text(&self) -> String {
        self.data.replace("=\r\n", "").replace("=3D", "=")
    }
}

#[derive(Clone, Default)]
pub struct FakeSmtp {
    pub addr: Option<SocketAddr>,
    mails: Arc<Mutex<Vec<Mail>>>,
}

impl FakeSmtp {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let smtp = FakeSmtp { addr: Some(listener.local_addr()?), mails: Arc::default() };
        let mails = smtp.mails.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let mails = mails.clone();
                tokio::spawn(async move {
                    let _ = session(socket, mails).await;
                });
            }
        });
        Ok(smtp)
    }

    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr.map(|a| a.to_string()).unwrap_or_default())
    }

    pub fn mails(&self) -> Vec<Mail> {
        self.mails.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Waits up to 10 s for a mail to `recipient`.
    pub async fn mail_to(&self, recipient: &str) -> anyhow::Result<Mail> {
        self.mail_to_with(recipient, "").await
    }

    /// Waits up to 10 s for a mail to `recipient` whose text contains `marker`.
    pub async fn mail_to_with(&self, recipient: &str, marker: &str) -> anyhow::Result<Mail> {
        for _ in 0..100 {
            let found = self
                .mails()
                .into_iter()
                .find(|m| m.recipients.iter().any(|r| r.contains(recipient)) && m.text().contains(marker));
            if let Some(mail) = found {
                return Ok(mail);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("no mail to {recipient} with {marker:?} arrived; got {:?}", self.mails())
    }

    /// The path and query of the first link in a mail to `recipient` that starts with `prefix`
    /// (`/verify?token=`, …), waiting for that mail up to 10 s.
    pub async fn link_to(&self, recipient: &str, prefix: &str) -> anyhow::Result<String> {
        let text = self.mail_to_with(recipient, prefix).await?.text();
        let start = text.find(prefix).unwrap_or_default();
        let end = text[start..].find(char::is_whitespace).map_or(text.len(), |e| start + e);
        Ok(text[start..end].to_owned())
    }
}

async fn session(socket: tokio::net::TcpStream, mails: Arc<Mutex<Vec<Mail>>>) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"220 fake-smtp ready\r\n").await?;
    let mut recipients = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let verb = line.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" | "HELO" => write.write_all(b"250-fake-smtp\r\n250 8BITMIME\r\n").await?,
            "MAIL" | "NOOP" => write.write_all(b"250 OK\r\n").await?,
            "RSET" => {
                recipients.clear();
                write.write_all(b"250 OK\r\n").await?;
            }
            "RCPT" => {
                recipients.push(line.split_once(':').map(|(_, r)| r.trim().to_owned()).unwrap_or_default());
                write.write_all(b"250 OK\r\n").await?;
            }
            "DATA" => {
                write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let mut data = String::new();
                while let Some(line) = lines.next_line().await? {
                    if line == "." {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                    data.push_str("\r\n");
                }
                if let Ok(mut m) = mails.lock() {
                    m.push(Mail { recipients: std::mem::take(&mut recipients), data });
                }
                write.write_all(b"250 queued\r\n").await?;
            }
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => write.write_all(b"502 not implemented\r\n").await?,
        }
    }
    Ok(())
}
