-- Recommendations exclude every track a user has ever played: look plays up by (user, track).
CREATE INDEX idx_plays_user_track ON plays (user_id, track_id);
