//! Tokens and grants of an organization. Issuing and revoking a token and granting and
//! removing a permission are events, so the audit log shows who did what; token secrets are
//! shown once and stored only as hashes.

use chrono::{DateTime, Utc};
use ekm_domain::{EventMetadata, Grant, OrgId, OrgRole, PrincipalKind, PrincipalName, ScopeError};
use ekm_store::time::rfc3339;
use ekm_store::{NewToken, Tokens};

use crate::app::{Action, App, AppError, Outcome};

impl App {
    /// Records a `TokenIssued` event (the audit entry, with the caller as actor), then
    /// stores the token's hash. Returns the token, whose secret is shown once.
    pub async fn issue_token(
        &self,
        org: OrgId,
        principal: &PrincipalName,
        kind: PrincipalKind,
        role: OrgRole,
        expires_at: Option<DateTime<Utc>>,
        metadata: &EventMetadata,
    ) -> Result<NewToken, AppError> {
        let token = Tokens::new_token();
        let issued = self
            .act(
                org.scope_id(),
                Action::IssueToken {
                    token_id: token.id.clone(),
                    principal: principal.clone(),
                    kind,
                    role,
                    expires_at: expires_at.map(rfc3339),
                },
                metadata,
                None,
            )
            .await;
        match issued {
            // Recorded, even if the read models could not be brought up to it: the issue is
            // audited, so the token is stored and handed out as usual.
            Ok(_) | Err(AppError::Committed { .. }) => {}
            Err(other) => return Err(other),
        }
        // The hash is stored once the issue is recorded: a token nobody audited never works.
        self.tokens()
            .issue(
                &token,
                org,
                principal.as_str(),
                kind,
                role,
                expires_at.map(|at| at.timestamp_micros()),
            )
            .await?;
        Ok(token)
    }

    /// Revokes a token of `org`: it stops working at once on this instance (and within the
    /// token cache's lifetime on others), then the revocation is recorded. `false` when the
    /// organization has no token with this id.
    pub async fn revoke_token(
        &self,
        org: OrgId,
        token_id: &str,
        metadata: &EventMetadata,
    ) -> Result<bool, AppError> {
        let owner = self.tokens().org_of(token_id).await?;
        if owner != Some(Some(org.to_string())) {
            return Ok(false);
        }
        // Revoke first: the refusal starts now, whatever happens to the event.
        self.tokens().revoke(token_id).await?;
        self.forget_principals();
        let outcome = self
            .act(
                org.scope_id(),
                Action::RevokeToken(token_id.to_owned()),
                metadata,
                None,
            )
            .await;
        match outcome {
            // A token issued before token events existed has no event to revoke.
            // Committed: the revocation is recorded, though not yet read back.
            Ok(_)
            | Err(AppError::Rule(ScopeError::TokenNotFound))
            | Err(AppError::Committed { .. }) => Ok(true),
            Err(other) => Err(other),
        }
    }

    /// Grants a permission (`Action::Grant`), until `expires_at` if given (the scheduler
    /// then records its removal; it stops counting at that instant either way); cached
    /// principals are forgotten so the next request sees it.
    pub async fn grant(
        &self,
        org: OrgId,
        grant: Grant,
        expires_at: Option<DateTime<Utc>>,
        metadata: &EventMetadata,
    ) -> Result<Outcome, AppError> {
        let action = Action::Grant {
            grant,
            expires_at: expires_at.map(rfc3339),
        };
        let outcome = self.act(org.scope_id(), action, metadata, None).await?;
        self.forget_principals();
        Ok(outcome)
    }

    /// Removes a grant (`Action::Ungrant`); cached principals are forgotten at once.
    pub async fn ungrant(
        &self,
        org: OrgId,
        grant: Grant,
        metadata: &EventMetadata,
    ) -> Result<Outcome, AppError> {
        let outcome = self
            .act(org.scope_id(), Action::Ungrant(grant), metadata, None)
            .await?;
        self.forget_principals();
        Ok(outcome)
    }
}
