"""placeholder"""
SubsampledSelfAttention = patch_bert = None
