"""--ip-masq and the forward rules: the pure planner of flanneld's chains and their repairs
(`plan`) and the keeper that runs iptables-save/restore to put them in place (`keeper`).
"""
