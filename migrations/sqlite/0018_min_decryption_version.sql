-- The decryption floor of a scope (issue 17 §3): key versions below it do not decrypt, and
-- `retire` destroys only versions below it. 1: every version decrypts.
ALTER TABLE scope_view ADD COLUMN min_decryption_version INTEGER NOT NULL DEFAULT 1;
