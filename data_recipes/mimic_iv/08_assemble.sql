-- One wide table with every task's rows: ids, label, then the feature columns (order fixed in Python).
CREATE OR REPLACE TABLE features_all AS
SELECT w.task, w.subject_id, w.hadm_id, w.label,
    c.* EXCLUDE (task, hadm_id),
    d.* EXCLUDE (task, hadm_id),
    p.* EXCLUDE (task, hadm_id),
    m.* EXCLUDE (task, hadm_id),
    x.* EXCLUDE (task, hadm_id)
FROM task_windows w
JOIN context_feats c ON c.task = w.task AND c.hadm_id = w.hadm_id
JOIN dx_feats d ON d.task = w.task AND d.hadm_id = w.hadm_id
JOIN proc_feats p ON p.task = w.task AND p.hadm_id = w.hadm_id
JOIN med_feats m ON m.task = w.task AND m.hadm_id = w.hadm_id
JOIN meas_feats x ON x.task = w.task AND x.hadm_id = w.hadm_id;
