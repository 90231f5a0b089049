-- Retired key versions stay listed (with the position that retired them); their key
-- material is deleted by the key shredder.
ALTER TABLE key_version_view ADD COLUMN retired_position bigint;
CREATE INDEX key_material_parent ON key_material (parent_id, parent_version);
